"""`gptpipe report` (and `python -m pipeline.report`, the DVC stage)."""

from __future__ import annotations

from pathlib import Path

from pipeline.console import ParamsOption, SetOption, print_summary, stage_command
from pipeline.params import load_params


@stage_command("report")
def report(params: ParamsOption = Path("params.yaml"), set_: SetOption = []):  # noqa: B006
    """Draw the training curves and write report.md and a self-contained report.html (metrics, curves, samples)."""
    from pipeline.report.stage import build_report

    p = load_params(params, set_)
    page = build_report(p)
    print_summary(f"report -> {p.report.out_dir}", {"report": str(page)})
