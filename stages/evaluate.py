"""DVC stage `evaluate`: the same command as `gptpipe evaluate` (see `--help`)."""

from pipeline.cli import run_stage

if __name__ == "__main__":
    run_stage("evaluate")
