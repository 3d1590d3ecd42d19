"""DVC stage `sample`: the same command as `gptpipe sample` (see `--help`)."""

import os
import sys

# Run as a script, this folder is first on sys.path, where stages/tokenize.py would shadow the
# standard library's `tokenize` (which tracebacks and inspect import): take it off.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from pipeline.cli import run_stage  # noqa: E402

if __name__ == "__main__":
    run_stage("sample")
