"""The GPU check's own plumbing, on the CPU: the same steps at toy sizes, one table (bench/gpu_check.py --cpu)."""

import subprocess
import sys

from conftest import ROOT, clean_env


def test_the_gpu_check_runs_its_parts_and_prints_one_table():
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--budget", "300"], cwd=ROOT, capture_output=True,
                         text=True, env=clean_env(), timeout=600)
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| part | ok | result | seconds |", out.stdout + out.stderr[-2000:]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table[1:]}
    assert "| yes |" in rows["tests"] and "passed" in rows["tests"], rows
    assert any(name.startswith("gptpipe ZeRO 0 fp32") and "tok/s" in line and "| yes |" in line for name, line in rows.items()), rows
    # No nanoGPT checkout here (it is never part of this repository): said, and the check fails rather than pass quietly.
    assert "no nanoGPT checkout given" in rows["nanoGPT bench.py"] and out.returncode == 1
