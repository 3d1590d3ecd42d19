"""DVC stage `sample`: the same command as `gptpipe sample` (see `--help`)."""

from pipeline.cli import run_stage

if __name__ == "__main__":
    run_stage("sample")
