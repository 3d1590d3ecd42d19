"""`gptpipe prepare` (and `python -m pipeline.prepare`, the DVC stage)."""

from __future__ import annotations

from pathlib import Path

from pipeline.console import ParamsOption, SetOption, print_summary, stage_command
from pipeline.params import load_params
from pipeline.progress import byte_progress


@stage_command("prepare")
def prepare(params: ParamsOption = Path("params.yaml"), set_: SetOption = []):  # noqa: B006
    """Read the corpus, normalise it, split documents into train and val."""
    from pipeline.prepare.sources import source_size
    from pipeline.prepare.stage import prepare_corpus

    cfg = load_params(params, set_).prepare
    with byte_progress("prepare", source_size(cfg)) as advance:
        manifest = prepare_corpus(cfg, progress=advance, download_progress=byte_progress)
    print_summary(
        f"prepare -> {cfg.out_dir}",
        {
            "train documents": manifest["documents"]["train"],
            "val documents": manifest["documents"]["val"],
            "train MB": manifest["bytes"]["train"] / 1e6,
            "val MB": manifest["bytes"]["val"] / 1e6,
            "dropped (duplicate)": manifest["dropped"]["duplicate"],
            "dropped (short)": manifest["dropped"]["short"],
            "invalid bytes replaced": manifest["replaced"],
        },
    )
