"""`python -m pipeline.train`: the DVC stage `train`, the same command as `gptpipe train` (see `--help`)."""

from pipeline.console import run_stage
from pipeline.train.command import train

run_stage(train, "train")
