"""`gptpipe train` (and `python -m pipeline.train`, the DVC stage and what the deepspeed launcher runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.console import ParamsOption, SetOption, echo, print_summary, stage_command
from pipeline.infra.distributed import init_distributed, is_launched, leave_process_group
from pipeline.infra.launcher import relaunch
from pipeline.params import load_params
from pipeline.progress import count_progress


@stage_command("model", "train")
def train(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    fresh: Annotated[bool, typer.Option("--fresh", help="start over instead of resuming (the same as -S train.resume=never)")] = False,
    local_rank: Annotated[int, typer.Option("--local_rank", "--local-rank", hidden=True, help="set by the deepspeed launcher")] = -1,
):
    """Train with DeepSpeed (resuming a compatible checkpoint) and export a Hugging Face folder."""

    set_ = [*set_, "train.resume=never"] if fresh else set_
    p = load_params(params, set_)
    if p.train.launcher == "deepspeed" and not is_launched():
        raise typer.Exit(relaunch(p.train, params, set_, echo))

    from pipeline.train.loop import train as run_training

    dist = init_distributed(timeout_s=p.train.collective_timeout)
    summary = run_training(p, progress=count_progress, echo=echo, dist=dist)
    leave_process_group(dist)
    if summary:
        print_summary(f"train -> {p.train.export_dir}", summary)
