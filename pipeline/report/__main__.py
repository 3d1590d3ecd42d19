"""`python -m pipeline.report`: the DVC stage `report`, the same command as `gptpipe report` (see `--help`)."""

from pipeline.console import run_stage
from pipeline.report.command import report

run_stage(report, "report")
