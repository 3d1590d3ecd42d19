"""Token files (header, checks, atomic writes) and tokenize_corpus end to end on a small prepared corpus."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA as SHARED  # TIKTOKEN_CACHE_DIR points into it (conftest)

from pipeline.config.tokenize import TokenizeConfig
from pipeline.errors import UserError
from pipeline.tokenize.stage import Chunk, chunk_documents, encode_chunks, tokenize_corpus
from pipeline.tokenize.tokenizers import EOT, build_tokenizer, load_tokenizer
from pipeline.tokens import HEADER, HEADER_BYTES, TokenWriter, open_tokens, write_tokens


@pytest.fixture(scope="module")
def docs() -> list[str]:
    path = SHARED / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.fail(f"{path} not found: the shared data folder must sit beside the repo (see its README)")
    return path.read_text(encoding="utf-8").split("\n\n")


def write_prepared(folder: Path, train: list[str], val: list[str]) -> Path:
    """A prepared corpus as the prepare stage writes it (store: text): one {"text": ...} per line, and a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, texts in [("train", train), ("val", val)]:
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    (folder / "manifest.json").write_text(json.dumps({"params": {"store": "text"}}))
    return folder


# ------------------------------------------------------------------------------------------ token files


@pytest.mark.parametrize("vocab_size, dtype", [(50257, np.uint16), (65536, np.uint16), (65537, np.uint32), (200_000, np.uint32)])
def test_write_read_round_trip(tmp_path, vocab_size, dtype):
    ids = np.random.default_rng(0).integers(0, vocab_size, 10_000)
    path = tmp_path / "x.bin"
    with TokenWriter(path, vocab_size, eot_id=vocab_size - 1) as w:
        for part in np.array_split(ids, 7):  # streamed in pieces
            w.write(part)
    f = open_tokens(path, verify=True)
    assert f.dtype == dtype and f.tokens.dtype == dtype
    assert (f.count, f.vocab_size, f.eot_id, len(f)) == (10_000, vocab_size, vocab_size - 1, 10_000)
    assert np.array_equal(f.tokens, ids)
    assert f.crc32 == zlib.crc32(ids.astype(dtype).tobytes())
    assert path.stat().st_size == HEADER_BYTES + 10_000 * np.dtype(dtype).itemsize
    assert not f.tokens.flags.writeable
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_empty_token_file(tmp_path):
    write_tokens(tmp_path / "e.bin", np.array([], dtype=np.uint32), 100, 0)
    f = open_tokens(tmp_path / "e.bin", verify=True)
    assert f.count == 0 and f.tokens.size == 0


def test_writer_error_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with TokenWriter(tmp_path / "x.bin", 100, 0) as w:
            w.write(np.arange(10))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.bin"
    write_tokens(path, np.arange(1000) % 500, vocab_size=500, eot_id=499)
    return path


def test_missing_and_tiny_files(tmp_path):
    with pytest.raises(UserError, match=r"nope\.bin: token file not found"):
        open_tokens(tmp_path / "nope.bin")
    (tmp_path / "tiny.bin").write_bytes(b"GPTP")
    with pytest.raises(UserError, match=r"tiny\.bin: 4 bytes, too small"):
        open_tokens(tmp_path / "tiny.bin")


def test_corrupt_magic(good):
    data = bytearray(good.read_bytes())
    data[:8] = b"NOTATOKN"
    good.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"good\.bin: not a gptpipe token file"):
        open_tokens(good)


def test_truncated_file(good):
    good.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(UserError, match=r"good\.bin: truncated: the header declares 1,000 tokens"):
        open_tokens(good)


def test_extra_bytes(good):
    good.write_bytes(good.read_bytes() + b"\0\0")
    with pytest.raises(UserError, match=r"good\.bin: 2 unexpected bytes after the 1,000 tokens"):
        open_tokens(good)


def test_bad_crc_found_by_verify(good):
    data = bytearray(good.read_bytes())
    data[HEADER_BYTES + 10] ^= 0xFF
    good.write_bytes(bytes(data))
    open_tokens(good)  # the header and size are fine: only verify reads the payload
    with pytest.raises(UserError, match=r"good\.bin: corrupt: crc32"):
        open_tokens(good, verify=True)


def test_ids_beyond_vocab_found_by_verify(tmp_path):
    path = tmp_path / "big_ids.bin"
    write_tokens(path, np.arange(300), vocab_size=1000, eot_id=0)
    data = bytearray(path.read_bytes())
    fields = list(HEADER.unpack_from(data))
    fields[3] = 200  # the header's vocab_size; the payload and its crc stay right
    HEADER.pack_into(data, 0, *fields)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"big_ids\.bin: holds token id 299, not below the header's vocab_size 200"):
        open_tokens(path, verify=True)


def test_writer_refuses_ids_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        write_tokens(tmp_path / "x.bin", np.array([0, 70000]), vocab_size=65536, eot_id=0)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ parallel encoding


@pytest.mark.parametrize("kind", ["tiktoken", "char", "bpe"])
def test_parallel_equals_serial(kind, docs):
    cfg = TokenizeConfig(kind=kind, vocab_size=300)
    tok = build_tokenizer(cfg, lambda: iter(docs[:300]))
    sample = docs[:2000] if kind == "bpe" else docs
    serial = []
    for doc in sample:
        serial += tok.encode(doc) + [tok.eot_id]
    chunks = chunk_documents(((i, "train", d) for i, d in enumerate(sample)), 4096)
    parallel = np.concatenate([ids for _, ids in encode_chunks(lambda c: tok.encode_documents(c.docs), chunks, 3)])
    assert parallel.tolist() == serial


def test_bounded_chunks_in_flight():
    pulled = 0

    def chunks():
        nonlocal pulled
        for i in range(100):
            pulled += 1
            yield Chunk("train", [f"doc {i}"], 5, i + 1)

    done = 0
    for _ in encode_chunks(lambda chunk: np.array([len(chunk.docs[0])]), chunks(), workers=2):
        done += 1
        assert pulled - done <= 2 * 2  # never reads far ahead of what is written
    assert done == 100


def test_chunk_documents_counts_utf8_bytes_per_split():
    docs = ["ab", "é", "日本", "x" * 10, "z"]
    chunks = list(chunk_documents(((i, "train", d) for i, d in enumerate(docs)), chunk_bytes=5))
    assert chunks == [Chunk("train", ["ab", "é", "日本"], 2 + 2 + 6, 3), Chunk("train", ["x" * 10], 10, 4), Chunk("train", ["z"], 1, 5)]
    # Interleaved splits (store: index) are grouped per split, each in order; end is the stream position after a chunk.
    mixed = [(0, "train", "aaa"), (1, "val", "v"), (2, "train", "bbb"), (3, "val", "w")]
    assert list(chunk_documents(mixed, chunk_bytes=5)) == [Chunk("train", ["aaa", "bbb"], 6, 3), Chunk("val", ["v", "w"], 2, 4)]


# ------------------------------------------------------------------------------------- tokenize_corpus


@pytest.mark.parametrize("kind", ["tiktoken", "char"])
def test_tokenize_corpus_end_to_end(tmp_path, docs, kind):
    train, val = docs[:400] + ["ünïcode ☃"], docs[400:450]
    prepared = write_prepared(tmp_path / "prepared", train, val)
    out = tmp_path / "tokens"
    cfg = TokenizeConfig(kind=kind, out_dir=str(out), chunk_bytes=1024, workers=2, unknown_chars="error")
    seen = []
    meta, throughput = tokenize_corpus(cfg, prepared, progress=seen.append)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "tokens"]  # no temporary leftovers
    assert sorted(p.name for p in out.iterdir()) == [".gptpipe-output", "meta.json", "tokenizer", "train-00000.bin", "val-00000.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    tok = load_tokenizer(out / "tokenizer")
    assert (meta["vocab_size"], meta["eot_id"], meta["tokenizer"]["kind"]) == (tok.vocab_size, tok.eot_id, kind)
    for split, texts in [("train", train), ("val", val)]:
        f = open_tokens(out / f"{split}-00000.bin", verify=True)
        info = meta["splits"][split]
        assert info["documents"] == len(texts)
        assert info["tokens"] == f.count == (f.path.stat().st_size - HEADER_BYTES) // f.dtype.itemsize
        assert info["text_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert int((f.tokens == tok.eot_id).sum()) == len(texts)  # one EOT after every document
        assert tok.decode(f.tokens) == EOT.join(texts) + EOT
        assert f.dtype.name == meta["dtype"] == "uint16"
    assert sum(seen) == meta["text_bytes"] == sum(s["text_bytes"] for s in meta["splits"].values())
    assert throughput["tokens_per_s"] > 0 and throughput["mb_per_s"] > 0 and throughput["workers"] == 2


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("kind", ["tiktoken", "char", "bpe"])
def test_prepare_and_tokenize_twice_give_byte_identical_outputs(tmp_path, docs, kind):
    """DVC hashes outputs by content: a rerun on the same text must not make the stages after it run again."""
    from pipeline.config.prepare import PrepareConfig
    from pipeline.prepare.stage import prepare_corpus

    (tmp_path / "corpus.txt").write_text("\n\n".join(docs[:300]))
    outs = []
    for attempt in ("a", "b"):
        prepared = PrepareConfig(source={"kind": "files", "path": str(tmp_path / "corpus.txt"), "separator": "\n\n"},
                                 out_dir=str(tmp_path / attempt / "prepared"))
        prepare_corpus(prepared)
        # Different worker counts and chunk sizes change the speed only, never the tokens.
        cfg = TokenizeConfig(kind=kind, vocab_size=300, out_dir=str(tmp_path / attempt / "tokens"),
                             workers=1 if attempt == "a" else 2, chunk_bytes=1024 if attempt == "a" else 4096)
        tokenize_corpus(cfg, prepared.out_dir)
        outs.append({name: folder_bytes(tmp_path / attempt / name) for name in ("prepared", "tokens")})
    assert outs[0] == outs[1]


def test_tokenize_corpus_failure_keeps_old_output(tmp_path, docs):
    prepared = write_prepared(tmp_path / "prepared", docs[:50], ["a character unseen in train: ☃"])
    out = tmp_path / "tokens"
    out.mkdir()
    (out / ".gptpipe-output").write_text("an earlier run's output")
    (out / "old.txt").write_text("previous run")
    cfg = TokenizeConfig(kind="char", out_dir=str(out), unknown_chars="error")
    with pytest.raises(UserError, match=r"prepared \(val split\): character '☃' \(U\+2603\) is absent from the train split"):
        tokenize_corpus(cfg, prepared)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tokens.partial", "prepared", "tokens"]  # kept for a rerun
    assert sorted(p.name for p in out.iterdir()) == [".gptpipe-output", "old.txt"]


def test_tokenize_corpus_without_prepared_data(tmp_path):
    cfg = TokenizeConfig(kind="tiktoken", out_dir=str(tmp_path / "tokens"))
    with pytest.raises(UserError, match=r"manifest\.json not found: run the prepare stage first"):
        tokenize_corpus(cfg, tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- shards and resuming


def prepared_corpus(tmp_path, docs, n=1500, **cfg):
    from pipeline.config.prepare import PrepareConfig
    from pipeline.prepare.stage import prepare_corpus

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs[:n]))
    prepared = PrepareConfig(source={"kind": "files", "path": str(tmp_path / "corpus.txt"), "separator": "\n\n"},
                             out_dir=str(tmp_path / "prepared"), **cfg)
    prepare_corpus(prepared)
    return prepared.out_dir


def test_shards_read_as_one_sequence(tmp_path, docs):
    """Shards of exactly shard_tokens ids hold the same ids as one file, and slices across them, windows and batches
    read the same; store: index gives the same tokens as store: text."""
    from pipeline.config.train import Batch
    from pipeline.layout import TokensDir
    from pipeline.tokens import open_split, read_meta
    from pipeline.train.batches import WindowSampler

    prepared = prepared_corpus(tmp_path, docs)
    one = TokenizeConfig(kind="char", out_dir=str(tmp_path / "one"))
    many = TokenizeConfig(kind="char", out_dir=str(tmp_path / "many"), shard_tokens=4096, chunk_bytes=3000)
    tokenize_corpus(one, prepared)
    meta, _ = tokenize_corpus(many, prepared)
    whole = open_split(TokensDir(one.out_dir), "train", read_meta(one.out_dir))
    sharded = open_split(TokensDir(many.out_dir), "train", meta)
    counts = meta["splits"]["train"]["shards"]
    assert len(counts) > 10 and set(counts[:-1]) == {4096} and 0 < counts[-1] <= 4096
    assert sorted(p.name for p in (tmp_path / "many").glob("train-*")) == [f"train-{i:05d}.bin" for i in range(len(counts))]
    assert len(sharded) == len(whole) and np.array_equal(np.asarray(sharded), whole[:])
    for start, stop in [(0, 10), (4090, 4100), (4096, 8192), (100, 3 * 4096 + 5), (len(whole) - 3, len(whole) + 9)]:
        assert np.array_equal(sharded[start:stop], whole[start:stop])
    batch = Batch(micro_batch_size=8, grad_accum=1, world_size=1, block_size=64)
    a, b = (WindowSampler(t, batch=batch, seed=3, rank=0) for t in (whole, sharded))
    for step in range(5):
        assert all(torch_equal(x, y) for x, y in zip(a.micro_batch(step, 0, "cpu"), b.micro_batch(step, 0, "cpu")))
    index = prepared_corpus(tmp_path / "i", docs, store="index")
    again, _ = tokenize_corpus(TokenizeConfig(kind="char", out_dir=str(tmp_path / "i" / "tokens"), shard_tokens=4096), index)
    assert again["splits"] == meta["splits"]
    assert folder_bytes(tmp_path / "i" / "tokens") == folder_bytes(tmp_path / "many")


def torch_equal(x, y) -> bool:
    import torch

    return torch.equal(x, y)


KILLED_TOKENIZE = """
import sys, time
from pipeline.config.tokenize import TokenizeConfig
from pipeline.tokenize.stage import tokenize_corpus
cfg = TokenizeConfig(kind="tiktoken", out_dir=sys.argv[2], shard_tokens=4096, chunk_bytes=2048, workers=1)
tokenize_corpus(cfg, sys.argv[1], progress=lambda n: time.sleep(0.02))  # slow, so the kill lands mid-run
"""


def test_a_killed_tokenize_resumes_from_its_finished_shards(tmp_path, docs):
    """SIGKILL after some shards are finished: the rerun keeps them, encodes only the rest, and its output is
    byte-identical to a run never interrupted. Other params start afresh."""
    import os
    import signal
    import subprocess
    import sys
    import time

    prepared = prepared_corpus(tmp_path, docs, n=3000, store="index")
    out = tmp_path / "tokens"
    child = subprocess.Popen([sys.executable, "-c", KILLED_TOKENIZE, str(prepared), str(out)], env={**os.environ},
                             cwd=Path(__file__).resolve().parents[1])
    partial = tmp_path / ".tokens.partial"
    deadline = time.monotonic() + 120
    while not (partial / "progress.json").exists() or len(list(partial.glob("train-*.bin"))) < 3:
        assert child.poll() is None and time.monotonic() < deadline, "the tokenize child ended before it could be killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists() and (partial / "progress.json").is_file()
    finished = json.loads((partial / "progress.json").read_text())["train"]["shards"]

    cfg = TokenizeConfig(kind="tiktoken", out_dir=str(out), shard_tokens=4096, chunk_bytes=2048)
    meta, throughput = tokenize_corpus(cfg, prepared)
    assert throughput["resumed_tokens"] >= 4096 * len(finished) > 0
    assert not partial.exists() and not (out / "progress.json").exists() and not list(out.glob("*.tmp"))
    fresh = TokenizeConfig(kind="tiktoken", out_dir=str(tmp_path / "fresh"), shard_tokens=4096, chunk_bytes=8192)
    _, uninterrupted = tokenize_corpus(fresh, prepared)
    assert uninterrupted["resumed_tokens"] == 0
    assert folder_bytes(out) == folder_bytes(tmp_path / "fresh")

    # Interrupted again, then rerun with another shard size: nothing of the old run is kept.
    (tmp_path / ".fresh.partial").mkdir()
    (tmp_path / ".fresh.partial" / "progress.json").write_text(json.dumps({"identity": {}, "train": {}}))
    (tmp_path / ".fresh.partial" / "train-00000.bin").write_bytes(b"left over")
    other, resumed = tokenize_corpus(fresh.model_copy(update={"shard_tokens": 8192}), prepared)
    assert resumed["resumed_tokens"] == 0 and other["splits"]["train"]["tokens"] == meta["splits"]["train"]["tokens"]
