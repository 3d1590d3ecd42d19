"""Token files (header, checks, atomic writes) and tokenize_corpus end to end on a small prepared corpus."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA as SHARED  # TIKTOKEN_CACHE_DIR points into it (conftest)

from pipeline.config import TokenizeConfig
from pipeline.data import HEADER, HEADER_BYTES, TokenWriter, open_tokens, write_tokens
from pipeline.encoding import chunk_documents, encode_chunks, tokenize_corpus
from pipeline.errors import UserError
from pipeline.tokenizers import EOT, build_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def docs() -> list[str]:
    path = SHARED / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.fail(f"{path} not found: the shared data folder must sit beside the repo (see its README)")
    return path.read_text(encoding="utf-8").split("\n\n")


def write_prepared(folder: Path, train: list[str], val: list[str]) -> Path:
    """A prepared corpus as the prepare stage writes it: one {"text": ...} per line."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, texts in [("train", train), ("val", val)]:
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
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
    parallel = np.concatenate([ids for ids, _, _ in encode_chunks(tok.encode_documents, chunk_documents(sample, 4096), 3)])
    assert parallel.tolist() == serial


def test_bounded_chunks_in_flight():
    pulled = 0

    def chunks():
        nonlocal pulled
        for i in range(100):
            pulled += 1
            yield [f"doc {i}"], 5

    done = 0
    for ids, n, size in encode_chunks(lambda texts: np.array([len(texts[0])]), chunks(), workers=2):
        done += 1
        assert pulled - done <= 2 * 2  # never reads far ahead of what is written
    assert done == 100


def test_chunk_documents_counts_utf8_bytes():
    chunks = list(chunk_documents(["ab", "é", "日本", "x" * 10, "z"], chunk_bytes=5))
    assert chunks == [(["ab", "é", "日本"], 2 + 2 + 6), (["x" * 10], 10), (["z"], 1)]


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
    assert sorted(p.name for p in out.iterdir()) == [".gptpipe-output", "meta.json", "tokenizer", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    tok = load_tokenizer(out / "tokenizer")
    assert (meta["vocab_size"], meta["eot_id"], meta["tokenizer"]["kind"]) == (tok.vocab_size, tok.eot_id, kind)
    for split, texts in [("train", train), ("val", val)]:
        f = open_tokens(out / f"{split}.bin", verify=True)
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
    from pipeline.config import PrepareConfig
    from pipeline.sources import prepare_corpus

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
    with pytest.raises(UserError, match=r"val\.jsonl: character '☃' \(U\+2603\) is absent from the train split"):
        tokenize_corpus(cfg, prepared)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "tokens"]
    assert sorted(p.name for p in out.iterdir()) == [".gptpipe-output", "old.txt"]


def test_tokenize_corpus_without_prepared_data(tmp_path):
    cfg = TokenizeConfig(kind="tiktoken", out_dir=str(tmp_path / "tokens"))
    with pytest.raises(UserError, match=r"train\.jsonl not found"):
        tokenize_corpus(cfg, tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []
