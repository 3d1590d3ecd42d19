"""`gptpipe plan` against what a run really takes: the memory estimate against the peak a probe measures, and the
probe's ETA against the wall time of a real run of `--factor` (100) times the probe's steps, on tiny Shakespeare.

    python bench/plan_check.py --shape tiny            # 2 layers x 32, characters: seconds
    python bench/plan_check.py --shape gpt2-124m       # GPT-2 124M's layers, GPT-2's vocabulary, bf16: minutes

The train stage runs as DVC runs it (`python -m pipeline.train`, timed whole); each figure prints with its ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

SHAPES = {
    "tiny": ({"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}, {"kind": "char"},
             {"micro_batch_size": 4, "precision": "fp32"}),
    "gpt2-124m": ({"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 128}, {"kind": "tiktoken"},
                  {"micro_batch_size": 4, "precision": "bf16"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--probe", type=int, default=2, help="steps the probe runs")
    parser.add_argument("--factor", type=int, default=100, help="the real run is this many times the probe")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipeline import params
    from pipeline.tools.plan import eta, make_plan, run_probe

    model, tokenize, train = SHAPES[args.shape]
    steps = args.probe * args.factor
    with tempfile.TemporaryDirectory(prefix="gptpipe-plan-") as scratch:
        folder = Path(scratch)
        raw = {"prepare": {"source": {"kind": "files", "path": str(TEXT)}, "split": "tail", "dedup": False},
               "tokenize": tokenize, "model": model,
               "train": {**train, "max_steps": steps, "warmup_steps": 10, "eval_interval": max(1, steps // 4),
                         "save_interval": max(1, steps // 2), "log_interval": 10}}
        (folder / "params.yaml").write_text(yaml.safe_dump(raw))
        for stage in ("prepare", "tokenize"):
            subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=folder, check=True, capture_output=True)
        p = params.validate_params(raw)
        import os

        os.chdir(folder)
        plan = make_plan(p)
        probe = run_probe(p, folder, args.probe)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "pipeline.train"], cwd=folder, capture_output=True, text=True)
        real = time.perf_counter() - start
        if out.returncode:
            sys.exit(out.stderr[-3000:])
    predicted = eta(p, steps, probe)
    print(f"shape {args.shape}: {plan.shape.n_params:,} parameters, {train['precision']}, micro batch {train['micro_batch_size']} x {model['block_size']}")
    print("memory estimate by part: " + ", ".join(f"{k} {v / 1e6:,.0f} MB" for k, v in plan.memory.items()))
    print(f"memory: estimate {plan.total_memory / 1e6:,.0f} MB, probe measured {probe.peak_memory / 1e6:,.0f} MB: ratio {plan.total_memory / probe.peak_memory:.2f}")
    print(f"time: probe {args.probe} steps {probe.wall_s:.1f} s ({probe.seconds_per_step * 1000:,.0f} ms/step); ETA for {steps} steps"
          f" {predicted:.1f} s, real {real:.1f} s: ratio {predicted / real:.2f}")


if __name__ == "__main__":
    main()
