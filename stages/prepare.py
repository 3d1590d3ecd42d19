"""DVC stage `prepare`: the same command as `gptpipe prepare` (see `--help`)."""

from pipeline.cli import run_stage

if __name__ == "__main__":
    run_stage("prepare")
