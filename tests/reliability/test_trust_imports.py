"""Trusting what tokenize imports and reuses (issue 29): nanoGPT char data without a readable meta.pkl, meta.pkl files
damaged every way, a damaged meta.json, two tokenizers of one size, document_mask on data without end-of-text, and a
reused checkpoint's tokenizer. Every case ends in a successful import or one UserError naming the file and the key."""

import json
import os
import pickle
import random
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import run_training, tiny_params

from pipeline import params
from pipeline.config.tokenize import TokenizeConfig
from pipeline.errors import UserError
from pipeline.tokenize.imported import import_tokens, imported_ids
from pipeline.tokenize.stage import tokenize_corpus
from pipeline.tokenize.tokenizers import load_tokenizer
from pipeline.tokens import read_meta

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 4


def char_folder(folder: Path, text: str = TEXT) -> Path:
    """nanoGPT's data/shakespeare_char layout: uint16 character ids, meta.pkl with vocab_size, itos and stoi."""
    folder.mkdir(parents=True)
    chars = sorted(set(text))
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    cut = len(text) * 9 // 10
    np.array([stoi[c] for c in text[:cut]], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in text[cut:]], dtype=np.uint16).tofile(folder / "val.bin")
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(chars), "itos": itos, "stoi": stoi}))
    return folder


def imported(tmp_path: Path, dirs: list[Path], name: str = "tokens", **kw) -> dict:
    cfg = TokenizeConfig(kind="import", import_dirs=[str(d) for d in dirs], out_dir=str(tmp_path / name), **kw)
    return import_tokens(cfg)[0]


# ------------------------------------------------------------------------ char data without a readable meta.pkl


def not_a_file(kind: str):
    def make(path: Path) -> None:
        path.unlink()
        if kind == "folder":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)  # opening it to read would block: the reader must never try
        else:
            path.symlink_to(path.parent / "gone.pkl")

    return make


UNREADABLE_META = {
    "a folder": (not_a_file("folder"), r"meta.pkl is a folder, not a file"),
    "a FIFO": (not_a_file("fifo"), r"meta.pkl is not a regular file \(a FIFO"),
    "a broken link": (not_a_file("link"), r"meta.pkl is a broken link"),
    "missing, every id below 256": (lambda p: p.unlink(), r"has no meta.pkl and every id .* below 256 \(the largest is \d+\): "
                                    r"that is nanoGPT character data .* tokenize.import_encoding: gpt2"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(UNREADABLE_META))
def test_char_data_without_a_readable_meta_pkl_is_not_imported_as_gpt2_ids(tmp_path, case):
    damage, message = UNREADABLE_META[case]
    folder = char_folder(tmp_path / "shakespeare_char")
    damage(folder / "meta.pkl")
    with pytest.raises(UserError, match=message):
        imported(tmp_path, [folder])
    assert not (tmp_path / "tokens").exists()


def test_ids_below_256_are_gpt2_ids_when_the_user_says_so(tmp_path):
    folder = char_folder(tmp_path / "gpt2_bytes")
    (folder / "meta.pkl").unlink()
    meta = imported(tmp_path, [folder], import_encoding="gpt2")
    assert meta["tokenizer"]["kind"] == "tiktoken" and meta["splits"]["train"]["tokens"] == len(TEXT) * 9 // 10
    with pytest.raises(UserError, match=r"import_encoding: set with tokenize.kind=char"):
        params.validate_params({"tokenize": {"kind": "char", "import_encoding": "gpt2"}})


# ------------------------------------------------------------------------------------ meta.pkl, damaged every way


def mutations(data: bytes, count: int, seed: int = 29) -> list[bytes]:
    """count damaged copies of data: bytes flipped, cut off, inserted, deleted, repeated (a fixed seed)."""
    rng, out = random.Random(seed), []
    for n in range(count):
        b = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 3))):
            at = rng.randrange(len(b) + 1)
            how = n % 5 if len(b) > 4 else 2
            if how == 0 and at < len(b):
                b[at] = rng.randrange(256)
            elif how == 1:
                del b[at:]
            elif how == 2:
                b[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 5, 9))))
            elif how == 3:
                del b[at : at + rng.choice((1, 2, 7))]
            else:
                b[at:at] = b[at : at + rng.choice((1, 4, 16))] * rng.choice((2, 3))
        out.append(bytes(b))
    return out


def crafted(itos: dict[int, str]) -> dict[str, bytes]:
    """Hand-made meta.pkl files for the failures seen in the wild."""
    memo = lambda op, index: b"\x80\x04}" + op + struct.pack("<I", index) + b"0."  # noqa: E731
    deep_key = b"\x80\x04}N" + b"\x85" * 100_000 + b"K\x01s."  # {((((None,),),...): 1}: hashing it recursed in C
    surrogate = {**itos, 1: "\ud800"}
    return {
        "LONG_BINPUT 2**31": memo(b"r", 2**31),
        "LONG_BINGET 2**31": memo(b"j", 2**31),
        "10 bytes asking for a 2.4 GB memo": memo(b"r", 150_000_000),
        "a lone surrogate in itos": pickle.dumps({"vocab_size": len(itos), "itos": surrogate}),
        "vocab_size 10**15": pickle.dumps({"vocab_size": 10**15, "itos": itos}),
        "vocab_size True": pickle.dumps({"vocab_size": True, "itos": {0: "a"}}),
        "vocab_size 0": pickle.dumps({"vocab_size": 0, "itos": {}}),
        "stoi not itos's inverse": pickle.dumps({"vocab_size": len(itos), "itos": itos, "stoi": {"a": 0}}),
        "a deeply nested key": deep_key,
        "2 MB": pickle.dumps({"vocab_size": len(itos), "itos": itos, "pad": "x" * 2_000_000}),
        "empty": b"",
        "a list": pickle.dumps([1, 2, 3]),
        "a class": pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "x": UserError}),
        "an object": pickle.dumps(TokenizeConfig(), protocol=2),
    }


def test_every_damaged_meta_pkl_is_an_import_or_one_message(tmp_path):
    folder = char_folder(tmp_path / "shakespeare_char")
    good = (folder / "meta.pkl").read_bytes()
    itos = pickle.loads(good)["itos"]
    cases = {f"mutation {i}": m for i, m in enumerate(mutations(good, 400))}
    cases.update({f"protocol 0 mutation {i}": m for i, m in enumerate(mutations(pickle.dumps(pickle.loads(good), protocol=0), 100))})
    cases.update(crafted(itos))
    outcomes = {"imported": 0, "refused": 0}
    start = time.perf_counter()
    tracemalloc.start()
    try:
        for name, data in cases.items():
            (folder / "meta.pkl").write_bytes(data)
            try:
                imported(tmp_path, [folder])
                outcomes["imported"] += 1
            except UserError as e:
                assert "meta.pkl" in str(e) and "\n" not in str(e), (name, str(e))
                outcomes["refused"] += 1
            except BaseException as e:
                raise AssertionError(f"{name}: {type(e).__name__}: {e} from {data[:64]!r}") from e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak:,} bytes at the peak"  # the import's own buffers, no memo sized by the file
    assert time.perf_counter() - start < 120
    assert outcomes["imported"] >= 1 and outcomes["refused"] >= 400, outcomes
    for name, data in crafted(itos).items():  # each of these is refused
        (folder / "meta.pkl").write_bytes(data)
        with pytest.raises(UserError, match=r"meta.pkl"):
            imported(tmp_path, [folder])


def test_crafted_meta_pkl_messages_name_what_is_wrong(tmp_path):
    folder = char_folder(tmp_path / "shakespeare_char")
    itos = pickle.loads((folder / "meta.pkl").read_bytes())["itos"]
    files = crafted(itos)
    expected = {
        "LONG_BINPUT 2**31": r"memo index 2,147,483,648 at byte 3",
        "10 bytes asking for a 2.4 GB memo": r"memo index 150,000,000",
        "a lone surrogate in itos": r"itos maps id 1 to '\\ud800', a lone UTF-16 surrogate",
        "vocab_size 10**15": r"itos does not hold ids 0\.\.999999999999999",
        "vocab_size 0": r"vocab_size is 0: nanoGPT's char data has at least one character",
        "stoi not itos's inverse": r"stoi is not the inverse of itos",
        "a deeply nested key": r"more than 64 dicts, lists and tuples",
        "2 MB": r"is 2,000,\d+ bytes: nanoGPT's meta.pkl is a few KB, and more than 1,048,576 is refused unread",
        "a class": r"it names pipeline.errors.UserError",
        "an object": r"it names ",
    }
    for name, message in expected.items():
        (folder / "meta.pkl").write_bytes(files[name])
        with pytest.raises(UserError, match=message):
            imported(tmp_path, [folder])
    assert len(files["10 bytes asking for a 2.4 GB memo"]) == 10


# ------------------------------------------------------------------------------------------- a damaged meta.json


META_DAMAGE = {
    "vocabulary 0": ("vocab_size", 0, r"`vocab_size` is 0, not a vocabulary size"),
    "vocabulary as text": ("vocab_size", "63", r"`vocab_size` is \"63\", not a vocabulary size"),
    "vocabulary missing": ("vocab_size", None, r"`vocab_size` is missing"),
    "end-of-text negative": ("eot_id", -1, r"`eot_id` is -1, not a token id"),
    "end-of-text missing": ("eot_id", None, r"`eot_id` is missing"),
    "tokens as text": ("tokens", "many", r"`tokens` is \"many\", not a count"),
    "negative split tokens": ("splits.train.tokens", -5, r"`splits.train.tokens` is -5, not a count"),
    "shards not a list": ("splits.val.shards", "x", r"`splits.val.shards` is \"x\", not a list of token counts"),
    "splits a list": ("splits", [1], r"`splits` is \[1\], not \{split: counts\}"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(META_DAMAGE))
def test_a_damaged_meta_json_is_one_message_naming_the_key(tokens_dir, tmp_path, case):
    key, value, message = META_DAMAGE[case]
    tokens = Path(shutil.copytree(tokens_dir, tmp_path / "source"))
    meta = json.loads((tokens / "meta.json").read_text())
    *parents, last = key.split(".")
    inner = meta
    for part in parents:
        inner = inner[part]
    if value is None:
        del inner[last]
    else:
        inner[last] = value
    (tokens / "meta.json").write_text(json.dumps(meta))
    message = r"meta.json: " + message + r".*rerun the tokenize stage"
    with pytest.raises(UserError, match=message):
        read_meta(tokens)
    with pytest.raises(UserError, match=message):
        imported_ids([str(tokens)])  # the import's progress bar
    with pytest.raises(UserError, match=message):
        imported(tmp_path, [tokens])


# ----------------------------------------------------------------------------------- two tokenizers of one size


def test_tokenizers_of_one_kind_and_size_name_what_differs(tmp_path):
    a = char_folder(tmp_path / "a", "abc\n" * 50)
    b = char_folder(tmp_path / "b", "abd\n" * 50)
    with pytest.raises(UserError, match=rf"b uses other token ids than .*a: both are char with 6 ids, but id 3 is 'c' in "
                                        rf".*a and 'd' in .*b; only folders of one tokenizer can be combined"):
        imported(tmp_path, [a, b])


# -------------------------------------------------------------------- document_mask on data without end-of-text


def test_document_mask_on_data_without_end_of_text_is_refused(tmp_path, shared_data):
    folder = char_folder(tmp_path / "shakespeare_char", (shared_data / "tinyshakespeare.txt").read_text()[:20_000])
    imported(tmp_path, [folder])  # one stream of characters: nanoGPT's data has no documents
    raw = tiny_params(tmp_path / "tokens", tmp_path / "run", max_steps=2, document_mask=True,
                      tokenize={"kind": "import", "import_dirs": [str(folder)], "out_dir": str(tmp_path / "tokens")})
    with pytest.raises(UserError, match=r"train.document_mask: the train split of .*tokens holds no end-of-text id \(\d+\).*"
                                        r"set train.document_mask: false"):
        run_training(raw)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------ a reused checkpoint's tokenizer, checked


def swap_two_characters(step: Path) -> None:
    """The same number of characters in another order: the tokenizer still loads, with other ids."""
    vocab = step / "tokenizer" / "vocab.json"
    tokens = json.loads(vocab.read_text(encoding="utf-8"))
    tokens[1], tokens[2] = tokens[2], tokens[1]
    vocab.write_text(json.dumps(tokens, ensure_ascii=False) + "\n", encoding="utf-8")


PRETRAINED_DAMAGE = {
    "a character swapped in vocab.json": (swap_two_characters, r"tokenizer/vocab.json is corrupt \(its sha256 differs"),
    "checksums.json missing": (lambda s: (s / "checksums.json").unlink(), r"checksums.json is missing"),
    "a file added to tokenizer/": (lambda s: (s / "tokenizer" / "extra.json").write_text("{}"), r"tokenizer/extra.json is not in checksums.json"),
    "checksums.json garbled": (lambda s: (s / "checksums.json").write_text("[1]"), r"checksums.json is not a checksum list"),
}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tokens_dir, tmp_path_factory) -> Path:
    """A tiny run with one checkpoint, step-000002."""
    root = tmp_path_factory.mktemp("pretrained")
    run_training(tiny_params(tokens_dir, root, max_steps=2, eval_interval=2, save_interval=2))
    (run,) = (root / "checkpoints").glob("run-*")
    return run


@pytest.mark.parametrize("case", list(PRETRAINED_DAMAGE))
def test_tokenize_pretrained_verifies_a_step_folders_checksums(trained, tokens_dir, tmp_path, case):
    damage, message = PRETRAINED_DAMAGE[case]
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    prepared = tokens_dir.parent / "prepared"
    reused = TokenizeConfig(kind="char", out_dir=str(tmp_path / "reused"), pretrained=str(run / "step-000002"))
    tokenize_corpus(reused, prepared)  # intact: its tokenizer is reused
    assert load_tokenizer(tmp_path / "reused" / "tokenizer").decode([1, 2]) == load_tokenizer(run / "step-000002" / "tokenizer").decode([1, 2])
    damage(run / "step-000002")
    for named in (run / "step-000002", run):  # the step folder, and the run folder whose newest step it is
        cfg = reused.model_copy(update={"pretrained": str(named), "out_dir": str(tmp_path / "refused")})
        with pytest.raises(UserError, match=r"tokenize.pretrained: the checkpoint .*step-000002 is not intact: " + message):
            tokenize_corpus(cfg, prepared)
    assert not (tmp_path / "refused").exists()
