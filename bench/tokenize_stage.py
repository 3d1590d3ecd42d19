"""Benchmark the tokenize stage: parallel throughput against a one-thread tiktoken loop, and peak memory vs corpus size.

    .venv/bin/python bench/tokenize_stage.py [--text PATH] [--repeats 5] [--copies 16] [--scales 1 5 20] [--kinds tiktoken char bpe]

(a) tiktoken gpt2 through the stage's own path (pipeline.tokenize.stage.encode_chunks: chunks of documents encoded
    on every core) against `enc.encode_ordinary` called document by document in one thread, on the same
    documents in the same run, interleaved. "cores busy" is CPU time / wall time: other processes on a
    shared machine cap it, and the speed-up with it.
(b) peak RSS of a child process running tokenize_corpus on a prepared corpus of tiny Shakespeare x1, x5
    and x20 (documents split at blank lines): it levels off instead of growing with the corpus.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is first on sys.path, where this file would shadow the standard library's
# `tokenize` (which linecache and inspect import): take it off, and put the repo root on instead.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(Path(__file__).resolve().parent)]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def read_documents(path: Path) -> list[str]:
    if not path.is_file():
        sys.exit(f"{path} not found: pass --text, or put the shared data folder beside the repo (see its README)")
    return [d for d in path.read_text(encoding="utf-8").split("\n\n") if d]


def timed(fn) -> tuple[float, float]:
    """(wall seconds, cores busy on average: CPU time of all this process's threads / wall)."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    wall = time.perf_counter() - start
    return wall, (time.process_time() - cpu) / wall


def bench_throughput(docs: list[str], repeats: int, chunk_bytes: int) -> list[tuple]:
    import tiktoken

    from pipeline.config.tokenize import TokenizeConfig
    from pipeline.tokenize.stage import chunk_documents, encode_chunks, usable_cores
    from pipeline.tokenize.tokenizers import build_tokenizer

    enc = tiktoken.get_encoding("gpt2")
    tok = build_tokenizer(TokenizeConfig(kind="tiktoken", encoding="gpt2"), lambda: iter(()))
    cores = usable_cores()
    size = sum(len(d.encode("utf-8")) for d in docs)

    def baseline() -> int:
        return sum(len(enc.encode_ordinary(d)) for d in docs) + len(docs)  # + the EOTs the stage adds

    def stage(workers: int):
        return lambda: sum(ids.size for ids, _, _ in encode_chunks(tok.encode_documents, chunk_documents(docs, chunk_bytes), workers))

    runs = {"encode_ordinary loop, 1 thread": baseline, "stage path, 1 worker": stage(1), f"stage path, {cores} workers": stage(cores)}
    tokens = {name: fn() for name, fn in runs.items()}  # warm up, and all must agree
    assert len(set(tokens.values())) == 1, tokens
    times = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so load from elsewhere hits every variant alike
        for name, fn in runs.items():
            times[name].append(timed(fn))
    base = [wall for wall, _ in times["encode_ordinary loop, 1 thread"]]
    rows = []
    for name, runs_ in times.items():
        walls = [wall for wall, _ in runs_]
        best, median = min(walls), statistics.median(walls)
        cores = statistics.median(c for _, c in runs_)
        rows.append((name, tokens[name] / best, size / 1e6 / best, tokens[name] / median, cores,
                     min(base) / best, statistics.median(base) / median))
    return rows


def write_prepared(folder: Path, docs: list[str], copies: int) -> int:
    folder.mkdir(parents=True)
    size = 0
    with open(folder / "train.jsonl", "w", encoding="utf-8") as train, open(folder / "val.jsonl", "w", encoding="utf-8") as val:
        for _ in range(copies):
            for i, doc in enumerate(docs):
                (val if i % 10 == 0 else train).write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                size += len(doc.encode("utf-8"))
    return size


def peak_rss_kb() -> tuple[int, int | None]:
    """(ru_maxrss, VmHWM) in KiB. Linux carries ru_maxrss across exec, so a child's starts at the parent's RSS
    when it was forked; VmHWM is the peak of this program alone (Linux only)."""
    hwm = None
    if Path("/proc/self/status").is_file():
        hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm


def child(prepared: str, out: str, kind: str) -> None:
    """Run tokenize_corpus in this (child) process and print its peak memory as JSON."""
    from pipeline.config.tokenize import TokenizeConfig
    from pipeline.tokenize.stage import tokenize_corpus

    cfg = TokenizeConfig(kind=kind, out_dir=out)
    if kind == "tiktoken":
        from pipeline.tokenize.tokenizers import build_tokenizer

        build_tokenizer(cfg, lambda: iter(()))  # loaded before the baseline: memory the corpus size cannot change
    before, _ = peak_rss_kb()
    meta, throughput = tokenize_corpus(cfg, prepared)
    peak, hwm = peak_rss_kb()
    print(json.dumps({"before_kb": before, "peak_kb": peak, "hwm_kb": hwm, "tokens": meta["tokens"],
                      "mb_per_s": throughput["mb_per_s"]}))


def bench_memory(docs: list[str], scales: list[int], kinds: list[str]) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptpipe-bench-") as tmp:
        for scale in scales:
            prepared = Path(tmp) / f"prepared_x{scale}"
            size = write_prepared(prepared, docs, scale)
            for kind in kinds:
                out = Path(tmp) / f"tokens_{kind}_x{scale}"
                done = subprocess.run([sys.executable, __file__, "--child", str(prepared), str(out), kind],
                                      capture_output=True, text=True, check=False)
                if done.returncode:
                    sys.exit(f"child failed:\n{done.stderr}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append((kind, f"x{scale}", size / 1e6, r["tokens"], r["before_kb"] / 1024, r["peak_kb"] / 1024,
                             (r["peak_kb"] - r["before_kb"]) / 1024, (r["hwm_kb"] or 0) / 1024, r["mb_per_s"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=SHARED / "tinyshakespeare.txt", help="corpus, split into documents at blank lines")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each variant (best and median reported)")
    parser.add_argument("--copies", type=int, default=16, help="throughput: the documents repeated this many times per run")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20, help="text per unit of parallel work (tokenize.chunk_bytes)")
    parser.add_argument("--scales", type=int, nargs="*", default=[1, 5, 20], help="memory: corpus sizes, in copies of the text (none: skip)")
    parser.add_argument("--kinds", nargs="+", default=["tiktoken"], choices=["tiktoken", "char", "bpe"], help="memory: tokenizers")
    parser.add_argument("--child", nargs=3, metavar=("PREPARED", "OUT", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    from rich.console import Console
    from rich.table import Table

    from pipeline.tokenize.stage import usable_cores

    console = Console(width=max(Console().width, 132))
    docs = read_documents(args.text)
    console.print(f"{args.text.name}: {len(docs):,} documents; {usable_cores()} cores; load average "
                  f"{os.getloadavg()[0]:.2f} (other processes share the cores)")

    # Memory first, while this parent is small: a child's ru_maxrss starts at the parent's RSS (see peak_rss_kb).
    table = Table(title="(b) peak memory of a child process running tokenize_corpus, by corpus size")
    for col in ["tokenizer", "corpus", "text MB", "tokens", "ru_maxrss before MB", "ru_maxrss after MB", "growth MB",
                "VmHWM MB", "MB/s (whole stage)"]:
        table.add_column(col, justify="left" if col in ("tokenizer", "corpus") else "right")
    for kind, scale, mb, tokens, before, peak, growth, hwm, mbs in bench_memory(docs, args.scales, args.kinds):
        table.add_row(kind, scale, f"{mb:.1f}", f"{tokens:,}", f"{before:.0f}", f"{peak:.0f}", f"{growth:.0f}", f"{hwm:.0f}", f"{mbs:.1f}")
    if args.scales:
        console.print(table)

    table = Table(title=f"(a) tiktoken gpt2 throughput: {args.copies} x the documents per run, {args.repeats} runs each")
    for col in ["variant", "tokens/s (best)", "MB/s (best)", "tokens/s (median)", "cores busy", "x loop (best)", "x loop (median)"]:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, tps, mbs, tps_med, cores, ratio, ratio_med in bench_throughput(docs * args.copies, args.repeats, args.chunk_bytes):
        table.add_row(name, f"{tps:,.0f}", f"{mbs:.1f}", f"{tps_med:,.0f}", f"{cores:.2f}", f"{ratio:.2f}", f"{ratio_med:.2f}")
    console.print(table)
    console.print(f"load average now {os.getloadavg()[0]:.2f}; 'cores busy' below the core count means other processes held them")


if __name__ == "__main__":
    main()
