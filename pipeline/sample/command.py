"""`gptpipe sample` (and `python -m pipeline.sample`, the DVC stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipeline.console import ParamsOption, SetOption, print_summary, stage_command
from pipeline.params import load_params, validate_overrides


@stage_command("sample")
def sample(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    prompt: Annotated[list[str], typer.Option("--prompt", help="ad hoc: sample these prompts and print, writing no files")] = [],  # noqa: B006
    model: Annotated[str | None, typer.Option("--model", help="a model folder, a training checkpoint or run folder, any HF folder or hub id")] = None,
):
    """Generate samples into sample.out_dir (samples.md, samples.jsonl), or with --prompt just print them."""
    from pipeline.sample.stage import generate_samples, sample_summary, write_samples

    # Ad hoc sampling from a given model needs no project: without a params.yaml the sample defaults apply.
    standalone = model is not None and params == Path("params.yaml") and not params.exists()
    p = load_params(params, set_) if not standalone else validate_overrides(set_)
    samples = generate_samples(p, prompts=prompt or None, model_dir=model)
    if prompt:
        for s in samples:
            Console().print(f"[bold]{s['prompt']}[/bold]{s['text']}\n", highlight=False)
        return
    write_samples(samples, p.sample.out_dir, sample_summary(p, model))
    print_summary(
        f"sample -> {p.sample.out_dir}",
        {"samples": len(samples), "tokens": sum(s["tokens"] for s in samples)},
    )
