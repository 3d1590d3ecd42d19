"""`gptpipe evaluate` (and `python -m pipeline.eval`, the DVC stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.console import ParamsOption, SetOption, echo, print_summary, stage_command
from pipeline.infra.distributed import init_distributed
from pipeline.params import load_params
from pipeline.progress import count_progress


@stage_command("evaluate")
def evaluate(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    local_rank: Annotated[int, typer.Option("--local_rank", "--local-rank", hidden=True, help="set by a launcher")] = -1,
):
    """Val loss, perplexity, bits per byte, accuracy, HellaSwag, lm-eval tasks and your own metrics of the trained model."""
    from pipeline.eval.stage import evaluate_model as run_evaluation

    p = load_params(params, set_)
    # Started by a launcher: the work is split across ranks, which wait for each other no longer than training does.
    dist = init_distributed(single_process_group=False, timeout_s=p.train.collective_timeout)
    metrics = run_evaluation(p, dist, progress=count_progress, echo=echo)  # it leaves the process group when done with it
    if dist.is_main:
        rows = {f"{group} {k}": v for group in ("val", "hellaswag") for k, v in (metrics.get(group) or {}).items()}
        rows.update({f"{task} {k}": v for task, values in metrics.get("lm_eval", {}).items() for k, v in values.items() if "stderr" not in k})
        rows.update({f"{name} {k}": v for name in p.evaluate.metrics for k, v in metrics.get(name.split(":")[1], {}).items()})
        print_summary(f"evaluate -> {p.evaluate.metrics_file}", rows)
        for note in metrics.get("notes", []):
            echo(f"note: {note}")
