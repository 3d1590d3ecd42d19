"""Time to a val loss of 1.88 on tiny Shakespeare at character level: gptpipe's real stages against a minimal loop.

Baseline (in the same run): bench/minimal.py, a minimal GPT and loop written the way nanoGPT's are, with
nanoGPT's CPU settings for shakespeare_char (4 layers, 4 heads, 128 wide, block 64, batch 12, lr 1e-3, 2,000
steps, fp32, its periodic estimate_loss), as one process; its wall time and its loss on the whole val split.

gptpipe: the shakespeare-char recipe on the local copy of the text, its stages run one after the other as DVC
runs them (`python -m pipeline.<package>`: prepare, tokenize, train, evaluate), with train.max_steps set to the steps
it needs; the wall time of the four processes and the loss the evaluate stage reports on the whole val split
(val = the last 10% of the text in both).

Runs alternate (A B A B ...) and the medians are compared: this machine is shared and noisy. A dated row is
appended to docs/benchmarks.md.

    python bench/time_to_loss.py [--repeats 3] [--steps 1100]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import append_row

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
TARGET = 1.88
STAGES = ("prepare", "tokenize", "train", "evaluate")


PACKAGES = {"prepare": "prepare", "tokenize": "tokenize", "train": "train", "evaluate": "eval"}


def run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def baseline(steps: int) -> dict:
    start = time.perf_counter()
    out = run([sys.executable, str(ROOT / "bench" / "minimal.py"), "--text", str(TEXT), "--steps", str(steps)], ROOT)
    return {**json.loads(out.strip().splitlines()[-1]), "wall": time.perf_counter() - start}


def pipeline(folder: Path, steps: int) -> dict:
    """The recipe through the real stages in a fresh folder; the stage processes' wall time and evaluate's val loss."""
    overrides = ["prepare.source.kind=files", f"prepare.source.path={TEXT}", f"train.max_steps={steps}", "train.sample_interval=null",
                 f"train.save_interval={steps}", f"train.eval_interval={steps}"]
    run([str(Path(sys.executable).with_name("gptpipe")), "recipe", "use", "shakespeare-char", "--force",
         *[a for o in overrides for a in ("-S", o)]], folder)
    seconds = {}
    for stage in STAGES:
        start = time.perf_counter()
        run([sys.executable, "-m", f"pipeline.{PACKAGES[stage]}", "-S", "train.resume=never"], folder)
        seconds[stage] = time.perf_counter() - start
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    return {"wall": sum(seconds.values()), "seconds": seconds, "val_loss": metrics["val"]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1100, help="gptpipe's train.max_steps (the recipe's settings otherwise)")
    parser.add_argument("--baseline-steps", type=int, default=2000)
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pipeline(folder, 40)  # untimed: DeepSpeed's one-time op build, the page cache
        base, ours = [], []
        for i in range(args.repeats):
            base.append(baseline(args.baseline_steps))
            ours.append(pipeline(folder, args.steps))
            print(f"round {i + 1}: minimal loop {base[-1]['wall']:.1f} s -> val {base[-1]['val_loss']:.4f};"
                  f" gptpipe {ours[-1]['wall']:.1f} s -> val {ours[-1]['val_loss']:.4f}"
                  f" ({', '.join(f'{k} {v:.1f}' for k, v in ours[-1]['seconds'].items())})", flush=True)
    b_wall, o_wall = statistics.median(r["wall"] for r in base), statistics.median(r["wall"] for r in ours)
    b_val, o_val = statistics.median(r["val_loss"] for r in base), statistics.median(r["val_loss"] for r in ours)
    reached = all(r["val_loss"] <= TARGET for r in ours)
    ratio = o_wall / b_wall
    print(f"\nminimal loop, {args.baseline_steps} steps: {b_wall:.1f} s (median of {args.repeats}), val {b_val:.4f}")
    print(f"gptpipe stages, {args.steps} steps: {o_wall:.1f} s, val {o_val:.4f} ({'every run' if reached else 'NOT every run'}"
          f" at or below {TARGET})")
    print(f"ratio gptpipe / minimal loop: {ratio:.2f} (target: 0.50 or less)")
    if not args.no_record:
        row = (f"| {datetime.date.today()} | {platform.node()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores |"
               f" {b_wall:.1f} s, val {b_val:.3f} | {o_wall:.1f} s, val {o_val:.3f} | {ratio:.2f} |")
        append_row("## Time to val 1.88", row,
                   intro="`python bench/time_to_loss.py`: wall time of prepare, tokenize, train and evaluate (the shakespeare-char recipe)"
                         " until the whole-val-split loss is at or below 1.88, against bench/minimal.py with nanoGPT's CPU settings; medians"
                         " of alternating runs.",
                   columns="| date | machine | cpu | minimal loop, 2000 steps | gptpipe stages | ratio |")


if __name__ == "__main__":
    main()
