"""gptpipe against the real nanoGPT at identical settings: wall time of a turn of the loop and the val loss it reaches.

nanoGPT is not part of this repository: fetch the pinned commit and point --nanogpt at it,

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT && git -C /tmp/nanoGPT checkout 3adf61e
    python bench/vs_nanogpt.py --nanogpt /tmp/nanoGPT [--pairs 3]

Its files are copied into a temporary folder and run there (its data/shakespeare_char/prepare.py on the shared copy
of tiny Shakespeare, then train.py); nothing of it is written here. Two settings, identical on both sides:

- readme: nanoGPT's README command for a CPU (4 layers x 128, block 64, batch 12, lr 1e-3 cosine to 1e-4 over 2000
  steps, warmup 100, beta2 0.99, eval every 250 steps on 20 batches, dropout 0, fp32);
- recipe: the shakespeare-char recipe's model and optimizer in nanoGPT's terms (1 layer x 128, lr 5e-3 cosine to
  5e-4 over 1100 steps, warmup 30), the schedule nanoGPT has (cosine, where the recipe ships warmup-stable-decay).

Each pair runs nanoGPT's `train.py` (one process, timed whole; its one-time data prep is not counted) and then
gptpipe's stages prepare, tokenize, train and evaluate as DVC runs them (`python -m pipeline.<package>`, each timed
whole, summed), A B A B. Both checkpoints are then scored by one function of this file: the mean next-character
loss over every 64-character window of the whole val split (the last 10% of the text), each model on its own
character ids. A third table puts each at its best: the recipe as shipped (wsd) against nanoGPT's better setting;
with --muon, the recipe with Muon (bench/optimizer_search.py's best) joins it.
Medians of the pairs; ratios are gptpipe / nanoGPT (below 1: gptpipe is faster). Rows go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PINNED = "3adf61e"
TARGET = 1.88
BLOCK = 64
STAGES = {"prepare": "prepare", "tokenize": "tokenize", "train": "train", "evaluate": "eval"}

# name -> (nanoGPT's command-line settings, the same in gptpipe's params)
SETTINGS = {
    "readme": (
        ["--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000"],
        {"model": {"n_layer": 4}, "train": {"max_steps": 2000, "decay_steps": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100}},
    ),
    "recipe": (
        ["--n_layer=1", "--n_head=4", "--n_embd=128", "--max_iters=1100", "--lr_decay_iters=1100", "--learning_rate=5e-3",
         "--min_lr=5e-4", "--warmup_iters=30"],
        {"model": {"n_layer": 1}, "train": {"max_steps": 1100, "decay_steps": 1100, "lr": 5e-3, "min_lr": 5e-4, "warmup_steps": 30}},
    ),
}
# nanoGPT's README command for a CPU, less the model and length (above); its config file adds beta2 0.99 and the rest.
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
               f"--block_size={BLOCK}", "--batch_size=12", "--dropout=0.0"]


def run(cmd: list[str], cwd: Path) -> float:
    """Run cmd to the end; its wall seconds (the whole process: imports, set-up, work)."""
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return seconds


# ------------------------------------------------------------------------------------------------ nanoGPT


def nanogpt_copy(checkout: Path, work: Path) -> Path:
    """Its code in work/nanogpt with tiny Shakespeare prepared by its own prepare.py (from the shared copy, offline)."""
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head != PINNED:
        print(f"note: {checkout} is at {head or 'an unknown commit'}, not the pinned {PINNED}")
    folder = work / "nanogpt"
    shutil.copytree(checkout, folder, ignore=shutil.ignore_patterns(".git", "assets", "*.ipynb"))
    data = folder / "data" / "shakespeare_char"
    shutil.copyfile(TEXT, data / "input.txt")  # its prepare.py downloads only when input.txt is missing
    run([sys.executable, "prepare.py"], data)
    return folder


def nanogpt_run(folder: Path, setting: str) -> dict:
    out = folder / f"out-{setting}"
    shutil.rmtree(out, ignore_errors=True)
    seconds = run([sys.executable, "train.py", *NANOGPT_CPU, *SETTINGS[setting][0], f"--out_dir={out.name}"], folder)
    return {"wall": seconds, "val": score_nanogpt(folder, out / "ckpt.pt")}


def score_nanogpt(folder: Path, ckpt_path: Path) -> float:
    sys.path.insert(0, str(folder))
    try:
        from model import GPT, GPTConfig  # nanoGPT's own model.py, from the temporary copy
    finally:
        sys.path.pop(0)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    ids = np.fromfile(folder / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16).astype(np.int64)
    return whole_val_loss(lambda x, y: model(x, y)[0], ids)  # with targets, nanoGPT returns the logits of every position


# ------------------------------------------------------------------------------------------------ gptpipe


# The recipe with Muon at its best of bench/optimizer_search.py (muon_lr 0.02, AdamW 5e-3 on the rest): the fewest
# steps of those tried that reach 1.88 on the whole val split.
MUON = {"optimizer": "muon", "muon_lr": 0.02, "max_steps": 800}


def gptpipe_params(setting: str | None, train: dict | None = None) -> dict:
    """The recipe file with the local text; setting: nanoGPT's settings on top (None: the recipe as shipped, with
    train on top: MUON)."""
    p = yaml.safe_load((ROOT / "recipes" / "shakespeare-char.yaml").read_text())
    p["prepare"]["source"] = {"kind": "files", "path": str(TEXT)}
    p["train"].update(sample_interval=None, resume="never")
    if setting is None:
        p["train"].update(max_steps=1100)  # the recipe's figure for 1.88
        p["train"].update(train or {})
        steps = p["train"]["max_steps"]
        p["train"].update(save_interval=steps, eval_interval=steps)
        return p
    p["model"].update(n_head=4, n_embd=128, block_size=BLOCK, dropout=0.0, **SETTINGS[setting][1]["model"])
    p["train"].update(micro_batch_size=12, schedule="cosine", beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=250,
                      eval_batches=20, log_interval=1, export="best", precision="fp32", **SETTINGS[setting][1]["train"])
    p["train"]["save_interval"] = p["train"]["max_steps"]  # with export: best it also saves each improvement, as nanoGPT does
    return p


def gptpipe_run(folder: Path, setting: str | None, train: dict | None = None) -> dict:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(gptpipe_params(setting, train), sort_keys=False))
    seconds = {stage: run([sys.executable, "-m", f"pipeline.{package}"], folder) for stage, package in STAGES.items()}
    evaluated = json.loads((folder / "reports" / "metrics.json").read_text())["val"]["loss"]
    return {"wall": sum(seconds.values()), "seconds": seconds, "val": score_gptpipe(folder), "evaluate_stage_val": evaluated}


def score_gptpipe(folder: Path) -> float:
    from transformers import AutoModelForCausalLM

    from pipeline.layout import TokensDir
    from pipeline.tokens import open_split, read_meta

    model = AutoModelForCausalLM.from_pretrained(folder / "models" / "final").eval()
    tokens = TokensDir(folder / "data" / "tokens")
    ids = np.asarray(open_split(tokens, "val", read_meta(tokens.root)).tokens, dtype=np.int64)
    return whole_val_loss(lambda x, y: model(input_ids=x).logits, ids)


# ------------------------------------------------------------------------------------------------ the scorer


@torch.no_grad()
def whole_val_loss(logits_of, ids: np.ndarray, batch: int = 64) -> float:
    """Mean next-token loss over the windows of BLOCK tokens that tile the val ids (the last one shorter)."""
    starts = list(range(0, len(ids) - 1, BLOCK))
    groups = [starts[i:i + batch] for i in range(0, len(starts), batch)]
    if starts[-1] + BLOCK + 1 > len(ids):  # the tail: its own, shorter window
        groups = [[s for s in g if s != starts[-1]] for g in groups] + [[starts[-1]]]
    total, count = 0.0, 0
    for group in (g for g in groups if g):
        width = min(BLOCK, len(ids) - 1 - group[0])
        x = torch.from_numpy(np.stack([ids[s:s + width] for s in group]))
        y = torch.from_numpy(np.stack([ids[s + 1:s + 1 + width] for s in group]))
        logits = logits_of(x, y)
        total += torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return total / count


# ------------------------------------------------------------------------------------------------ the run


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def table(title: str, ours: list[dict], theirs: list[dict], ours_name: str, theirs_name: str) -> str:
    o, t = median(ours, "wall"), median(theirs, "wall")
    spread = lambda rows: f"{min(r['wall'] for r in rows):.1f}-{max(r['wall'] for r in rows):.1f}"  # noqa: E731
    return (f"\n{title}\n"
            f"| side | wall s, median (range) | whole-val loss, median |\n|---|---|---|\n"
            f"| {theirs_name} | {t:.1f} ({spread(theirs)}) | {median(theirs, 'val'):.3f} |\n"
            f"| {ours_name} | {o:.1f} ({spread(ours)}) | {median(ours, 'val'):.3f} |\n"
            f"ratio gptpipe / nanoGPT: {o / t:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help=f"a checkout of karpathy/nanoGPT (pinned: {PINNED})")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no-best", action="store_true", help="skip the each-at-its-best table (the recipe as shipped)")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--muon", action="store_true", help="also the recipe with Muon (MUON) in the each-at-its-best table")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        sys.exit(f"--nanogpt {args.nanogpt}: no train.py there; fetch it as this script's docstring says")
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        nano = nanogpt_copy(args.nanogpt, work)
        gptpipe_run(work / "warm", "recipe")  # untimed: the page cache, any one-time build
        for pair in range(args.pairs):
            for setting in args.settings:
                side = results.setdefault(setting, {"nanogpt": [], "gptpipe": []})
                side["nanogpt"].append(nanogpt_run(nano, setting))
                side["gptpipe"].append(gptpipe_run(work / "gptpipe", setting))
                n, g = side["nanogpt"][-1], side["gptpipe"][-1]
                print(f"pair {pair + 1} {setting}: nanoGPT {n['wall']:.1f} s val {n['val']:.4f} | gptpipe {g['wall']:.1f} s val"
                      f" {g['val']:.4f} (its evaluate stage: {g['evaluate_stage_val']:.4f};"
                      f" {', '.join(f'{k} {v:.1f}' for k, v in g['seconds'].items())})", flush=True)
            if not args.no_best:
                best = results.setdefault("best", {"nanogpt": [], "gptpipe": []})
                best["gptpipe"].append(gptpipe_run(work / "gptpipe", None))
                g = best["gptpipe"][-1]
                print(f"pair {pair + 1} recipe as shipped: gptpipe {g['wall']:.1f} s val {g['val']:.4f}", flush=True)
                if args.muon:
                    muon = results.setdefault("muon", {"nanogpt": [], "gptpipe": []})
                    muon["gptpipe"].append(gptpipe_run(work / "gptpipe", None, MUON))
                    g = muon["gptpipe"][-1]
                    print(f"pair {pair + 1} recipe with Muon: gptpipe {g['wall']:.1f} s val {g['val']:.4f}"
                          f" ({', '.join(f'{k} {v:.1f}' for k, v in g['seconds'].items())})", flush=True)
    for setting in args.settings:
        print(table(f"{setting}: identical settings", results[setting]["gptpipe"], results[setting]["nanogpt"], "gptpipe, 4 stages",
                    "nanoGPT train.py"))
    if not args.no_best and results.get("best"):
        # nanoGPT at its best: whichever of its runs reached the lower loss in less time, at the target or not.
        candidates = {s: results[s]["nanogpt"] for s in args.settings}
        theirs_name = min(candidates, key=lambda s: (median(candidates[s], "val") > TARGET, median(candidates[s], "wall")))
        print(table(f"each at its best (target {TARGET}): gptpipe's recipe as shipped against nanoGPT's {theirs_name} settings",
                    results["best"]["gptpipe"], candidates[theirs_name], "gptpipe recipe (wsd, 1100 steps)", f"nanoGPT {theirs_name}"))
        if results.get("muon"):
            print(table(f"each at its best, Muon: the recipe with train.optimizer=muon ({MUON['max_steps']} steps) against nanoGPT's"
                        f" {theirs_name} settings", results["muon"]["gptpipe"], candidates[theirs_name],
                        f"gptpipe recipe, Muon ({MUON['max_steps']} steps)", f"nanoGPT {theirs_name}"))
            print(table("Muon against AdamW, both gptpipe's recipe (the 'nanoGPT' row is AdamW here)", results["muon"]["gptpipe"],
                        results["best"]["gptpipe"], "Muon", "AdamW").replace("gptpipe / nanoGPT", "Muon / AdamW"))
    if not args.no_record:
        for setting in args.settings:
            n, g = results[setting]["nanogpt"], results[setting]["gptpipe"]
            row = (f"| {datetime.date.today()} | {platform.machine()}, {os.cpu_count()} cores | {setting} | {median(n, 'wall'):.1f} s,"
                   f" val {median(n, 'val'):.3f} | {median(g, 'wall'):.1f} s, val {median(g, 'val'):.3f} |"
                   f" {median(g, 'wall') / median(n, 'wall'):.2f} |")
            append_row("## gptpipe against nanoGPT", row,
                       intro="`python bench/vs_nanogpt.py --nanogpt DIR`: karpathy/nanoGPT at 3adf61e (its `train.py`, one process) against"
                             " gptpipe's prepare, tokenize, train and evaluate processes at identical settings, A B A B; both scored on the"
                             " whole val split by one function; medians of the pairs.",
                       columns="| date | machine | settings | nanoGPT | gptpipe | ratio |")
    if math.isnan(sum(r["val"] for s in results.values() for r in s["gptpipe"])):
        sys.exit("a gptpipe run ended with a NaN loss")


if __name__ == "__main__":
    main()
