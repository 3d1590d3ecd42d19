"""What caching train.out_dir in DVC costs a turn of the loop, at GPT-2 124M shape, through real `dvc repro`.

A `gptpipe init` project (git + DVC, the cache type gptpipe sets) trains GPT-2 small's shape (12 x 768, GPT-2's
tokenizer, block 256, micro batch 4, bf16) on tiny Shakespeare for one step and saves a checkpoint with its
optimizer state (about 1.5 GB); then `dvc exp run -S train.max_steps=2` resumes it and saves a second one. Each
command is timed whole, and the train stage's own seconds (its summary) are taken out; the difference of what is
left between the two variants is DVC's hashing and caching of the checkpoints. Run twice: train.out_dir cached (as dvc.yaml has it) and with `cache: false`.
Disk: the project's checkpoints and DVC's cache, each inode once.

    python bench/checkpoint_cache.py [--cache-type reflink,copy]   # about 4 minutes and 8 GB of disk here
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODEL = {"arch": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 256, "dropout": 0.0}


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, out.stdout + out.stderr


def du(*paths: Path) -> int:
    seen, total = set(), 0
    for root in paths:
        for p in root.rglob("*") if root.exists() else []:
            st = p.lstat()
            if p.is_file() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def train_seconds(project: Path) -> float:
    return json.loads((project / "reports" / "train" / "metrics.json").read_text())["time"]["total"]


def project(folder: Path, cached: bool, cache_type: str | None) -> Path:
    gptpipe = str(Path(sys.executable).with_name("gptpipe"))
    run([gptpipe, "init", str(folder)], folder.parent)
    p = yaml.safe_load((folder / "params.yaml").read_text())
    p["prepare"]["source"] = {"kind": "files", "path": str(SHARED / "tinyshakespeare.txt"), "separator": "\n\n"}
    p["tokenize"].update(kind="tiktoken")
    p["model"].update(MODEL)
    p["train"].update(max_steps=1, warmup_steps=0, micro_batch_size=4, precision="bf16", save_interval=1, eval_interval=1,
                      eval_batches=1, log_interval=1, sample_interval=None, export="last")
    (folder / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    if not cached:
        text = (folder / "dvc.yaml").read_text()
        text = re.sub(r"(- \$\{train\.out_dir\}:\n\s+persist: true)", r"\1\n          cache: false", text)
        (folder / "dvc.yaml").write_text(text)
    if cache_type:
        run(["dvc", "config", "cache.type", cache_type], folder)
    run(["git", "add", "-A"], folder)
    run(["git", "commit", "-qm", "bench"], folder)
    return folder


def measure(folder: Path, cached: bool, cache_type: str | None) -> dict:
    proj = project(folder, cached, cache_type)
    first, _ = run(["dvc", "repro", "train"], proj)
    first_train = train_seconds(proj)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "first run"], proj)
    second, _ = run(["dvc", "exp", "run", "train", "-S", "train.max_steps=2"], proj)
    second_train = train_seconds(proj)
    ckpt = du(proj / "checkpoints")
    return {"first": first, "first_train": first_train, "second": second, "second_train": second_train,
            "checkpoints_gb": ckpt / 1e9, "disk_gb": du(proj / "checkpoints", proj / ".dvc" / "cache") / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-type", default=None, help="DVC's cache.type instead of what gptpipe init sets")
    args = parser.parse_args()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    rows = {}
    for cached in (True, False):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            rows[cached] = r = measure(Path(tmp) / "project", cached, args.cache_type)
        print(f"train.out_dir {'cached' if cached else 'cache: false'}: dvc repro {r['first']:.1f} s (train {r['first_train']:.1f} s),"
              f" dvc exp run {r['second']:.1f} s (train {r['second_train']:.1f} s); checkpoints {r['checkpoints_gb']:.2f} GB,"
              f" with DVC's cache {r['disk_gb']:.2f} GB", flush=True)
    for name, key in (("dvc repro", "first"), ("dvc exp run", "second")):
        # The train stage's own run differs a little between the two; what is left is the command around it.
        around = {c: rows[c][key] - rows[c][f"{key}_train"] for c in rows}
        print(f"{name}: outside training {around[True]:.1f} s with the checkpoints cached, {around[False]:.1f} s without"
              f" (the difference, {around[True] - around[False]:.1f} s, is DVC hashing and caching them)")


if __name__ == "__main__":
    main()
