"""DVC stage `train`: the same command as `gptpipe train` (see `--help`).

Also the script the deepspeed launcher runs: `deepspeed --hostfile hostfile stages/train.py`.
"""

from pipeline.cli import run_stage

if __name__ == "__main__":
    run_stage("train")
