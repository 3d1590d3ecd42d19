"""A short search for the fastest way to a whole-val loss of 1.88 on tiny Shakespeare (characters) with AdamW and
with Muon, at the shakespeare-char recipe's model (1 layer x 128, block 64, micro batch 12, wsd).

For each optimizer setting and each run length (the schedule planned to end there) gptpipe's train stage runs once;
the export is scored on the whole val split by bench/vs_nanogpt.py's scorer. The time to 1.88 of a setting is the
train stage's wall time (process start to exit) of its shortest run that reaches it. prepare and tokenize run once
and are the same for every row. Rows and the best of each optimizer print as a table for docs/benchmarks.md.

    python bench/optimizer_search.py [--lengths 400 600 800 1100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_nanogpt import STAGES, TARGET, gptpipe_params, score_gptpipe  # noqa: E402

# name -> train.* on top of the recipe as shipped (AdamW lr 5e-3, wsd, beta2 0.99).
SETTINGS = {
    "adamw lr 5e-3 (the recipe)": {},
    "adamw lr 8e-3": {"lr": 8e-3, "min_lr": 8e-4},
    "adamw lr 1.2e-2": {"lr": 1.2e-2, "min_lr": 1.2e-3},
    "muon 0.02 (its defaults), adamw 5e-3": {"optimizer": "muon"},
    "muon 0.04, adamw 5e-3": {"optimizer": "muon", "muon_lr": 0.04},
    "muon 0.08, adamw 5e-3": {"optimizer": "muon", "muon_lr": 0.08},
    "muon 0.04, adamw 1e-2": {"optimizer": "muon", "muon_lr": 0.04, "lr": 1e-2, "min_lr": 1e-3},
}


def train_once(folder: Path, base: dict, setting: dict, steps: int) -> dict:
    train = {k: v for k, v in setting.items() if k != "env"}
    p = {**base, "train": {**base["train"], **train, "max_steps": steps, "save_interval": steps, "eval_interval": steps}}
    (folder / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    start = time.perf_counter()
    env = {**os.environ, **setting.get("env", {})}
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--fresh"], cwd=folder, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    return {"wall": wall, "val": score_gptpipe(folder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[400, 600, 800, 1100])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gptpipe-search-") as scratch:
        folder = Path(scratch)
        base = gptpipe_params(None)
        (folder / "params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        for stage in ("prepare", "tokenize"):
            subprocess.run([sys.executable, "-m", f"pipeline.{STAGES[stage]}"], cwd=folder, check=True, capture_output=True)
        rows = []
        for name in args.settings:
            for steps in sorted(args.lengths):
                r = train_once(folder, base, SETTINGS[name], steps)
                rows.append({"setting": name, "steps": steps, **r})
                print(f"{name:40s} {steps:5d} steps: train {r['wall']:5.1f} s, whole-val {r['val']:.4f}", flush=True)
                if r["val"] <= TARGET:
                    break  # longer runs of this setting reach it later
    print(f"\n| setting | steps to {TARGET} (shortest length tried that reaches it) | train stage wall s | whole-val loss |\n|---|---|---|---|")
    for name in args.settings:
        mine = [r for r in rows if r["setting"] == name]
        hit = next((r for r in mine if r["val"] <= TARGET), None)
        last = mine[-1]
        print(f"| {name} | {hit['steps'] if hit else 'not reached'} | {(hit or last)['wall']:.1f} | {(hit or last)['val']:.4f} |")


if __name__ == "__main__":
    main()
