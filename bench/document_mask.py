"""train.document_mask on a corpus of short documents: val loss and training tokens/s with and without it.

The corpus is tiny Shakespeare cut at blank lines (one speech a document: 1-3 lines, ~190 characters on average,
so a 256-character window holds two or more documents). The model is the shakespeare-char recipe's shape at
block_size 256. Each side trains in turn (A B A B: off, on, off, on), each run a fresh `python -m pipeline.train`.
Each export is then scored by the evaluate stage twice, over the whole val split: per document (attention inside
each document, what the mask trains for; a document's first tokens see nothing before them) and across documents
(the whole window, as a model without the mask was trained). Medians of the pairs and the on/off ratios print as a
table for docs/benchmarks.md.

    python bench/document_mask.py [--steps 600] [--pairs 2] [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def params(text: Path, steps: int, document_mask: bool) -> dict:
    p = yaml.safe_load((ROOT / "recipes" / "shakespeare-char.yaml").read_text())
    p["prepare"].update(source={"kind": "files", "path": str(text), "separator": "\n\n"}, split="hash", dedup=False)
    p["model"]["block_size"] = 256
    p["train"].update(max_steps=steps, save_interval=steps, eval_interval=steps, sample_interval=None, resume="never",
                      document_mask=document_mask, micro_batch_size=12)
    return p


def stage(folder: Path, package: str, *overrides: str) -> float:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", f"pipeline.{package}", *[a for o in overrides for a in ("-S", o)]], cwd=folder,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"pipeline.{package} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start


def run_side(folder: Path, text: Path, steps: int, document_mask: bool) -> dict:
    (folder / "params.yaml").write_text(yaml.safe_dump(params(text, steps, document_mask), sort_keys=False))
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    wall = stage(folder, "train")
    summary = json.loads((folder / "reports" / "train" / "metrics.json").read_text())
    scores = {}
    info = folder / "models" / "final" / "gptpipe.json"
    trained = json.loads(info.read_text())
    for name, masked in (("per document", True), ("across documents", False)):
        # evaluate scores as the export was trained (its gptpipe.json): each way in turn, the file restored after
        info.write_text(json.dumps({**trained, "params": {**trained["params"], "train": {**trained["params"]["train"], "document_mask": masked}}}))
        stage(folder, "eval")
        scores[name] = json.loads((folder / "reports" / "metrics.json").read_text())["val"]["loss"]
    info.write_text(json.dumps(trained))
    return {"wall": wall, "tokens_per_s": summary["train"]["tokens_per_s"], **scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    source = args.shared / "tinyshakespeare.txt"
    if not source.is_file():
        sys.exit(f"{source} not found: link the shared/ folder beside the repo or pass --shared")
    with tempfile.TemporaryDirectory(prefix="gptpipe-docmask-") as scratch:
        folder = Path(scratch)
        text = folder / "speeches.txt"
        text.write_text(source.read_text())
        (folder / "params.yaml").write_text(yaml.safe_dump(params(text, args.steps, False), sort_keys=False))
        stage(folder, "prepare")
        stage(folder, "tokenize")
        docs = [json.loads(line)["text"] for line in (folder / "data" / "prepared" / "train.jsonl").open()]
        print(f"corpus: {len(docs):,} train documents, {statistics.mean(map(len, docs)):.0f} characters on average; "
              f"{args.steps} steps of 12 x 256 characters\n", flush=True)
        rows = {False: [], True: []}
        for pair in range(args.pairs):
            for side in (False, True):
                r = run_side(folder, text, args.steps, side)
                rows[side].append(r)
                print(f"pair {pair + 1} document_mask={side!s:5}: train {r['wall']:5.1f} s, {r['tokens_per_s']:,.0f} tok/s, val loss per"
                      f" document {r['per document']:.4f}, across documents {r['across documents']:.4f}", flush=True)

    def med(side: bool, key: str) -> float:
        return statistics.median(r[key] for r in rows[side])

    print("\n| train.document_mask | val loss, per document | val loss, across documents | train tokens/s | train stage s |")
    print("|---|---|---|---|---|")
    for side in (False, True):
        print(f"| {str(side).lower()} | {med(side, 'per document'):.4f} | {med(side, 'across documents'):.4f} |"
              f" {med(side, 'tokens_per_s'):,.0f} | {med(side, 'wall'):.1f} |")
    print(f"| on / off | {med(True, 'per document') / med(False, 'per document'):.3f}x | "
          f"{med(True, 'across documents') / med(False, 'across documents'):.3f}x | "
          f"{med(True, 'tokens_per_s') / med(False, 'tokens_per_s'):.3f}x | {med(True, 'wall') / med(False, 'wall'):.3f}x |")


if __name__ == "__main__":
    main()
