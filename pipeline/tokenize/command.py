"""`gptpipe tokenize` (and `python -m pipeline.tokenize`, the DVC stage)."""

from __future__ import annotations

from pathlib import Path

from pipeline.console import ParamsOption, SetOption, print_summary, stage_command
from pipeline.params import load_params
from pipeline.progress import byte_progress, count_progress


@stage_command("tokenize")
def tokenize(params: ParamsOption = Path("params.yaml"), set_: SetOption = []):  # noqa: B006
    """Train or load the tokenizer and write memory-mappable token files."""
    from pipeline.files import write_json_atomic
    from pipeline.prepare.documents import prepared_size
    from pipeline.tokenize.stage import tokenize_corpus

    p = load_params(params, set_)
    if p.tokenize.kind == "import":  # ids made elsewhere (nanoGPT's train.bin/val.bin, token folders): copied, not encoded
        from pipeline.tokenize.imported import import_tokens, imported_ids

        with count_progress("import ids", imported_ids(p.tokenize.import_dirs)) as advance:
            meta, throughput = import_tokens(p.tokenize, progress=advance)
    else:
        with byte_progress("tokenize", prepared_size(p.prepare.out_dir)) as advance:
            meta, throughput = tokenize_corpus(p.tokenize, p.prepare.out_dir, progress=advance)
    write_json_atomic(p.tokenize.metrics_file, throughput)
    print_summary(
        f"tokenize -> {p.tokenize.out_dir}",
        {
            "tokenizer": meta["tokenizer"]["kind"],
            "vocab size": meta["vocab_size"],
            "train tokens": meta["splits"]["train"]["tokens"],
            "val tokens": meta["splits"]["val"]["tokens"],
            "dtype": meta["dtype"],
            "shards": sum(len(s["shards"]) for s in meta["splits"].values()),
            **({"kept from the interrupted run": throughput["resumed_tokens"]} if throughput.get("resumed_tokens") else {}),
            "tokens/s": throughput["tokens_per_s"],
            **({"MB/s": throughput["mb_per_s"]} if "mb_per_s" in throughput else {"imported from": ", ".join(p.tokenize.import_dirs)}),
        },
    )
