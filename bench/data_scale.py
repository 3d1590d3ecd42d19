"""The data path at scale: prepare + tokenize through real `dvc repro` on a corpus of gigabytes, tiktoken gpt2.

The corpus is tiny Shakespeare repeated, each copy's paragraphs prefixed with the copy's number so that no two
documents are the same (deduplication keeps them all, as it would a real corpus), written as 100 MB text files
split into documents at blank lines. For each size (a small one and a large one, so growth shows): the wall
time of `dvc repro tokenize` and of each stage inside it; the peak memory of each stage's process and of DVC's;
the disk used beyond the raw text (the workspace's prepared and token folders plus DVC's cache) against the
token bytes; how long a `dvc repro` with nothing to do takes; and, as the baseline, a one-thread loop of
tiktoken's encode_ordinary over the first 100 MB file's documents, before and after the stages (their mean).
The project's .dvc/config (its cache link type) and params.yaml are used, with prepare.store: index unless
--store text. A dated row per size goes to docs/benchmarks.md.

    python bench/data_scale.py [--gb 0.2 2.0] [--store index|text]     # needs about 3x the largest size in free disk
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
FILE_BYTES = 100 << 20


def write_corpus(folder: Path, target_bytes: int) -> int:
    """Numbered copies of the text until target_bytes, in files of about FILE_BYTES; returns the bytes written."""
    paragraphs = TEXT.read_text(encoding="utf-8").split("\n\n")
    folder.mkdir(parents=True)
    written, copy, index = 0, 0, 0
    while written < target_bytes:
        with open(folder / f"part-{index:05d}.txt", "w", encoding="utf-8") as f:
            size = 0
            while size < FILE_BYTES and written + size < target_bytes:
                block = "\n\n".join(f"{copy}: {p}" for p in paragraphs) + "\n\n"
                f.write(block)
                size += len(block.encode("utf-8"))
                copy += 1
        written += size
        index += 1
    return written


def du(*paths: Path) -> int:
    """Bytes on disk under paths, each inode once (a hard link into DVC's cache is not counted twice)."""
    seen, total = set(), 0
    for root in paths:
        for p in [root, *root.rglob("*")] if root.exists() else []:
            st = p.lstat()
            if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _status(pid: str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f if ":" in line)


def watch_peaks(root: int, peaks: dict[str, int], stop: threading.Event) -> None:
    """Every 0.1 s, the peak resident memory (VmHWM, a high-water mark) of each process under root, by what it
    runs: the prepare stage, the tokenize stage, or DVC itself."""
    while not stop.wait(0.1):
        parents = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                parents[int(pid)] = int(_status(pid)["PPid"])
            except (OSError, KeyError, ValueError):
                continue
        for pid in parents:
            up = pid
            while up not in (root, 0, 1) and up in parents:
                up = parents[up]
            if up != root and pid != root:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                kb = int(_status(str(pid)).get("VmHWM", "0 kB").split()[0])
            except (OSError, ValueError):
                continue
            label = next((s for s in ("prepare", "tokenize") if f"pipeline.{s}" in cmdline), "dvc")
            peaks[label] = max(peaks.get(label, 0), kb)


def run(cmd: list[str], cwd: Path, peaks: dict[str, int] | None = None) -> tuple[float, str]:
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(TEXT.parent / "tiktoken_cache"), "COLUMNS": "200",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()
    watcher = threading.Thread(target=watch_peaks, args=(child.pid, peaks, stop), daemon=True) if peaks is not None else None
    if watcher:
        watcher.start()
    out, _ = child.communicate()
    stop.set()
    if child.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return time.perf_counter() - start, out


def loop_tokens_per_s(path: Path) -> float:
    """The baseline: one thread, tiktoken's encode_ordinary document by document, over one corpus file."""
    import tiktoken

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TEXT.parent / "tiktoken_cache"))
    enc = tiktoken.get_encoding("gpt2")
    docs = path.read_text(encoding="utf-8").split("\n\n")
    start = time.perf_counter()
    tokens = sum(len(enc.encode_ordinary(d)) for d in docs)
    return tokens / (time.perf_counter() - start)


def measure(repo: Path, gb: float, store: str, cache_type: str | None = None) -> dict:
    for name in ("dvc.yaml", "pipeline"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    raw = write_corpus(repo / "data" / "raw" / "corpus", int(gb * 1e9))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["source"] = {"kind": "files", "path": "data/raw/corpus", "separator": "\n\n"}
    params["prepare"]["store"] = store
    params["tokenize"] = {**params["tokenize"], "kind": "tiktoken", "encoding": "gpt2"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        run(cmd, repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    if cache_type:  # the opt-in to compare with the project's default
        run(["dvc", "config", "cache.type", cache_type], repo)
    first_file = repo / "data" / "raw" / "corpus" / "part-00000.txt"
    loop = [loop_tokens_per_s(first_file)]  # before and after the stages: the machine's speed drifts
    peaks: dict[str, int] = {}
    seconds, out = run(["dvc", "repro", "tokenize"], repo, peaks)
    stages = {name: float(s.replace(",", "")) for name, s in re.findall(r"^(prepare|tokenize): ([\d.,]+) s$", out, re.M)}
    loop.append(loop_tokens_per_s(first_file))
    noop, out2 = run(["dvc", "repro", "tokenize"], repo)
    assert "Running stage" not in out2, out2[-2000:]
    tokens = repo / "data" / "tokens"
    token_bytes = sum(f.stat().st_size for f in tokens.glob("*.bin"))
    extra = du(repo / "data" / "prepared", tokens, repo / ".dvc" / "cache")
    return {"gb": raw / 1e9, "seconds": seconds, "stages": stages, "peaks": {k: v / 1024 for k, v in peaks.items()},
            "token_gb": token_bytes / 1e9, "extra_gb": extra / 1e9, "noop": noop, "loop": sum(loop) / len(loop),
            "shards": len(list(tokens.glob("*.bin")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, nargs="+", default=[0.2, 2.0], help="corpus sizes in GB, smallest first")
    parser.add_argument("--store", choices=["index", "text"], default="index", help="prepare.store")
    parser.add_argument("--cache-type", default=None, help="DVC's cache.type instead of the project's (e.g. hardlink,copy)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    for gb in args.gb:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(Path(tmp), gb, args.store, args.cache_type)
        tokens_per_s = r["token_gb"] / 2 * 1e9 / r["stages"].get("tokenize", float("nan"))
        ratio = tokens_per_s / r["loop"]
        cache = args.cache_type or "the project's"
        print(f"{r['gb']:.2f} GB of text, store {args.store}, cache.type {cache}: dvc repro {r['seconds']:.0f} s (prepare {r['stages'].get('prepare', 0):.0f} s,"
              f" tokenize {r['stages'].get('tokenize', 0):.0f} s, {tokens_per_s / 1e6:.1f}M tokens/s = {ratio:.2f}x a one-thread"
              f" loop's {r['loop'] / 1e6:.1f}M), peak memory: prepare {r['peaks'].get('prepare', 0):,.0f} MB, tokenize"
              f" {r['peaks'].get('tokenize', 0):,.0f} MB, dvc {r['peaks'].get('dvc', 0):,.0f} MB, {r['token_gb']:.2f} GB of tokens in {r['shards']}"
              f" shards, {r['extra_gb']:.2f} GB of disk beyond the raw text ({r['extra_gb'] / r['token_gb']:.2f}x the token bytes),"
              f" no-op dvc repro {r['noop']:.1f} s", flush=True)
        if not args.no_record:
            store = args.store + (f", cache.type {args.cache_type}" if args.cache_type else "")
            row = (f"| {datetime.date.today()} | {platform.machine()}, {os.cpu_count()} cores | {store} | {r['gb']:.2f} |"
                   f" {r['stages'].get('prepare', 0):.0f} | {r['stages'].get('tokenize', 0):.0f} | {tokens_per_s / 1e6:.1f}M |"
                   f" {ratio:.2f}x | {r['peaks'].get('prepare', 0):,.0f} / {r['peaks'].get('tokenize', 0):,.0f} / {r['peaks'].get('dvc', 0):,.0f} |"
                   f" {r['token_gb']:.2f} | {r['extra_gb'] / r['token_gb']:.2f}x | {r['noop']:.1f} |")
            append_row("## The data path at scale", row,
                       intro="`python bench/data_scale.py`: tiny Shakespeare repeated (every document unique) through real `dvc repro"
                             " tokenize` with tiktoken gpt2; disk counts the prepared and token folders and DVC's cache, each inode once.",
                       columns="| date | machine | prepare.store | text GB | prepare s | tokenize s | tokens/s | x one-thread loop |"
                               " peak MB: prepare / tokenize / dvc | token GB | disk beyond the raw text / token bytes | no-op dvc repro s |")


if __name__ == "__main__":
    main()
