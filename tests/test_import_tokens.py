"""tokenize.kind: import (issue 21): nanoGPT's train.bin/val.bin, with or without meta.pkl, become gptpipe token
folders; several token folders of one tokenizer combine; a meta.pkl that would run code is refused unrun."""

import json
import pickle

import numpy as np
import pytest
import tiktoken
from conftest import run_training, tiny_params

from pipeline import params
from pipeline.config.tokenize import TokenizeConfig
from pipeline.errors import UserError
from pipeline.layout import TokensDir
from pipeline.tokenize.imported import import_tokens
from pipeline.tokenize.tokenizers import load_tokenizer
from pipeline.tokens import open_split, read_meta


def nanogpt_char_folder(folder, text: str):
    """What nanoGPT's data/shakespeare_char/prepare.py writes (written here from its description, not copied)."""
    folder.mkdir(parents=True)
    chars = sorted(set(text))
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    cut = int(len(text) * 0.9)
    np.array([stoi[c] for c in text[:cut]], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in text[cut:]], dtype=np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return folder


def nanogpt_gpt2_folder(folder, docs: list[str]):
    """nanoGPT's openwebtext layout: gpt2 ids, an end-of-text after each document, no meta.pkl."""
    folder.mkdir(parents=True)
    enc = tiktoken.get_encoding("gpt2")
    ids = [i for d in docs for i in enc.encode_ordinary(d) + [enc.eot_token]]
    cut = len(ids) * 3 // 4
    np.array(ids[:cut], dtype=np.uint16).tofile(folder / "train.bin")
    np.array(ids[cut:], dtype=np.uint16).tofile(folder / "val.bin")
    return folder, ids


def imported(tmp_path, dirs, name="tokens", **kw):
    cfg = TokenizeConfig(kind="import", import_dirs=[str(d) for d in dirs], out_dir=str(tmp_path / name), **kw)
    return import_tokens(cfg)[0], tmp_path / name


def ids_of(folder, split):
    return np.asarray(open_split(TokensDir(folder), split, read_meta(folder)))


def test_nanogpt_char_data_imports_with_its_characters_and_trains(tmp_path, shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:50_000]
    source = nanogpt_char_folder(tmp_path / "shakespeare_char", text)
    meta, tokens = imported(tmp_path, [source], shard_tokens=10_000)  # several shards per split
    tok = load_tokenizer(tokens / "tokenizer")
    assert tok.kind == "char" and tok.vocab_size == len(set(text)) + 2  # + end-of-text and <unk>
    train = ids_of(tokens, "train")
    assert tok.decode(train) == text[: int(len(text) * 0.9)]  # the same text, id for id
    assert meta["splits"]["train"]["tokens"] == len(train) and len(meta["splits"]["train"]["shards"]) == 5
    assert meta["splits"]["val"]["text_bytes"] == len(text[int(len(text) * 0.9) :].encode())
    summary = run_training(tiny_params(tokens, tmp_path / "run", max_steps=2, tokenize={"kind": "import", "import_dirs": [str(source)],
                                                                                     "out_dir": str(tokens)}))
    assert summary["steps"] == 2


def test_nanogpt_gpt2_data_without_meta_and_combining_token_folders(tmp_path):
    a, ids_a = nanogpt_gpt2_folder(tmp_path / "a", ["Hello world, this is one document.", "And a second one here."] * 20)
    b, ids_b = nanogpt_gpt2_folder(tmp_path / "b", ["Another corpus entirely, café and naïve."] * 20)
    meta, tokens = imported(tmp_path, [a])
    assert load_tokenizer(tokens / "tokenizer").kind == "tiktoken" and meta["vocab_size"] == 50257
    assert ids_of(tokens, "train").tolist() == ids_a[: len(ids_a) * 3 // 4]
    enc = tiktoken.get_encoding("gpt2")
    assert meta["splits"]["train"]["text_bytes"] == len(enc.decode(ids_a[: len(ids_a) * 3 // 4]).replace("<|endoftext|>", "").encode())
    assert meta["splits"]["train"]["documents"] == ids_a[: len(ids_a) * 3 // 4].count(enc.eot_token)

    # A gptpipe token folder and a nanoGPT folder of the same ids combine, split by split, in the order given.
    _, token_b = imported(tmp_path, [b], name="tokens-b")
    both, combined = imported(tmp_path, [tokens, token_b], name="combined")
    assert ids_of(combined, "train").tolist() == ids_a[: len(ids_a) * 3 // 4] + ids_b[: len(ids_b) * 3 // 4]
    assert ids_of(combined, "val").tolist() == ids_a[len(ids_a) * 3 // 4 :] + ids_b[len(ids_b) * 3 // 4 :]
    parts = [read_meta(tokens)["splits"]["train"], read_meta(token_b)["splits"]["train"]]
    assert both["splits"]["train"]["text_bytes"] == sum(p["text_bytes"] for p in parts)
    assert both["splits"]["train"]["documents"] == sum(p["documents"] for p in parts)
    mixed, _ = imported(tmp_path, [a, token_b], name="mixed")  # a nanoGPT folder and a token folder
    assert mixed["splits"]["train"]["tokens"] == both["splits"]["train"]["tokens"]

    char = nanogpt_char_folder(tmp_path / "char", "some characters\n" * 50)
    with pytest.raises(UserError, match=r"char.* uses other token ids \(char, .* only folders of one tokenizer can be combined"):
        imported(tmp_path, [a, char], name="bad")


def test_a_meta_pkl_that_would_run_code_is_refused_before_anything_runs(tmp_path):
    folder = nanogpt_char_folder(tmp_path / "evil", "abc" * 100)
    witness = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(witness), "w"))  # unpickling would create the file

    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": Payload()}))
    with pytest.raises(UserError, match=r"meta.pkl is not a nanoGPT meta.pkl of plain data \(it names .*open\); refused, nothing in it ran"):
        imported(tmp_path, [folder])
    assert not witness.exists()
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": {0: "ab", 1: "c", 2: "d"}}))
    with pytest.raises(UserError, match=r"itos maps ids to single distinct characters"):
        imported(tmp_path, [folder])
    assert not (tmp_path / "tokens").exists()  # nothing half-written


def test_bad_nanogpt_files_are_one_message_each(tmp_path):
    folder, _ = nanogpt_gpt2_folder(tmp_path / "d", ["a document"] * 10)
    with open(folder / "val.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(UserError, match=r"val.bin is \d+ bytes, not a whole number of uint16 ids"):
        imported(tmp_path, [folder])
    np.array([1, 2, 60000], dtype=np.uint16).tofile(folder / "val.bin")
    with pytest.raises(UserError, match=r"val.bin holds id 60000 at position 2, outside the 50,257 tiktoken gpt2 ids"):
        imported(tmp_path, [folder])
    (folder / "train.bin").unlink()
    with pytest.raises(UserError, match=r"train.bin .*a nanoGPT data folder holds train.bin and val.bin"):
        imported(tmp_path, [folder])
    with pytest.raises(UserError, match=r"import_dirs: required when kind is 'import'"):
        params.validate_params({"tokenize": {"kind": "import"}})
    assert json.loads(json.dumps(TokenizeConfig().model_dump()))["import_dirs"] == []
