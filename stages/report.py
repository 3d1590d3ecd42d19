"""DVC stage `report`: the same command as `gptpipe report` (see `--help`)."""

from pipeline.cli import run_stage

if __name__ == "__main__":
    run_stage("report")
