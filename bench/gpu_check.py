"""The GPU check: one command on a GPU machine, one table of what gptpipe does there.

    bash bench/gpu_check.sh WHEELS NANOGPT     # installs what is missing from WHEELS, then runs this script

Runs, in order, with a time budget for each part so the whole fits a short loan of the machine (10 minutes):
  1. the tests whose code paths change on a GPU (engine, precision, training, models, sampling, elastic resume
     on one process), quietly, failures listed;
  2. `bench/train.py --preset gpt2-124m`: GPT-2 small in bf16, ZeRO 1 and 2, compile off and on, tokens/s and MFU
     against the GPU's dense bf16 peak;
  3. nanoGPT's own `bench.py` (its 124M model, synthetic data, bf16) with compile off and on, from the checkout
     given, copied to a temporary folder;
and prints one table. --cpu runs the same steps at toy sizes on the CPU, so everything but the GPU itself is
exercised where no GPU is (the test suite does that: tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ["tests/test_deepspeed_config.py", "tests/test_training.py", "tests/test_training_options.py", "tests/test_models.py",
             "tests/test_sampling.py", "tests/test_evaluation.py"]


def run(cmd: list[str], cwd: Path, budget_s: float, env: dict | None = None) -> tuple[int, str, float]:
    """(exit code, combined output, seconds); a command past its budget is stopped (exit code 124)."""
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=budget_s, env={**os.environ, **(env or {})})
        return out.returncode, out.stdout + out.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, text + f"\n(stopped after its budget of {budget_s:.0f} s)", time.perf_counter() - start


def tests(cpu: bool, budget_s: float) -> dict:
    selection = ["tests/test_deepspeed_config.py"] if cpu else GPU_TESTS
    code, out, seconds = run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection], ROOT, budget_s)
    summary = next((line for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", line)), out[-300:])
    return {"part": "tests", "ok": code == 0, "result": summary.strip("= "), "seconds": seconds}


def gptpipe_bench(cpu: bool, budget_s: float) -> list[dict]:
    args = ["--preset", "nanogpt-cpu", "--quick", "--steps", "5", "--warmup", "2", "--repeats", "1"] if cpu else \
           ["--preset", "gpt2-124m", "--steps", "30", "--repeats", "1"]
    code, out, seconds = run([sys.executable, "bench/train.py", *args, "--no-record"], ROOT, budget_s)
    rows = []
    for line in out.splitlines():
        m = re.match(r"ZeRO (\d) (\w+) compile (on|off): gptpipe ([\d,]+) tok/s.*MFU ([\d.]+)%", line)
        if m:
            rows.append({"part": f"gptpipe ZeRO {m[1]} {m[2]} compile {m[3]}", "ok": True, "result": f"{m[4]} tok/s, MFU {m[5]}%",
                         "seconds": None})
    if code != 0 or not rows:
        rows.append({"part": "gptpipe bench/train.py", "ok": False, "result": out.strip().splitlines()[-1][:200] if out.strip() else f"exit {code}",
                     "seconds": seconds})
    return rows


def nanogpt_bench(nanogpt: Path | None, cpu: bool, budget_s: float) -> list[dict]:
    """nanoGPT's bench.py on synthetic data (real_data=False), compile off and on."""
    if nanogpt is None or not (nanogpt / "bench.py").is_file():
        return [{"part": "nanoGPT bench.py", "ok": False, "result": "no nanoGPT checkout given (second argument)", "seconds": None}]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "nanogpt"
        shutil.copytree(nanogpt, copy, ignore=shutil.ignore_patterns(".git", "assets", "*.ipynb", "data"))
        if cpu:  # its bench.py times with torch.cuda.synchronize(): a GPU part, checked here only as far as the copy
            return [{"part": "nanoGPT bench.py", "ok": True, "result": f"copied from {nanogpt}; not run: it needs CUDA", "seconds": None}]
        for compile_ in (False, True):
            code, out, seconds = run([sys.executable, "bench.py", "--real_data=False", f"--compile={compile_}", "--batch_size=16",
                                      "--dtype=bfloat16"], copy, budget_s / 2)
            times = [float(m) for m in re.findall(r"time ([\d.]+)ms", out)]
            mfus = [float(m) for m in re.findall(r"mfu ([\d.]+)%", out)]
            ok = code == 0 and bool(times)
            result = f"{min(times):.1f} ms/iter (best), MFU {max(mfus):.1f}% (nanoGPT's own A100 figure)" if ok else out.strip()[-200:]
            rows.append({"part": f"nanoGPT 124M compile {'on' if compile_ else 'off'}", "ok": ok, "result": result, "seconds": seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT (3adf61e)")
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU: the check's own plumbing, no GPU figures")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole check (split over the parts)")
    args = parser.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --cpu to exercise the check itself")
    where = "CPU (toy sizes)" if args.cpu else f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    print(f"gptpipe GPU check on {where}, torch {torch.__version__}, Python {sys.version.split()[0]}", flush=True)
    rows = [tests(args.cpu, 0.35 * args.budget)]
    print(f"tests: {rows[-1]['result']}", flush=True)
    rows += gptpipe_bench(args.cpu, 0.4 * args.budget)
    rows += nanogpt_bench(args.nanogpt, args.cpu, 0.25 * args.budget)
    print("\n| part | ok | result | seconds |\n|---|---|---|---|")
    for r in rows:
        seconds = f"{r['seconds']:.0f}" if r["seconds"] is not None else ""
        print(f"| {r['part']} | {'yes' if r['ok'] else 'NO'} | {r['result']} | {seconds} |")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
