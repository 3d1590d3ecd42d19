"""Tokenizers: round trips, tiktoken equality, char policies, special-token text, save/load for every kind."""

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA as SHARED  # TIKTOKEN_CACHE_DIR points into it (conftest)

from pipeline.config.tokenize import TokenizeConfig
from pipeline.errors import UserError
from pipeline.tokenize.tokenizers import EOT, CharTokenizer, HfTokenizer, TiktokenTokenizer, build_tokenizer, load_tokenizer

SAMPLE = "Hello world!  Ünïcödé → 日本語 😀\n\n\tTabs,   spaces\r\nand 123 numbers.\n"


@pytest.fixture(scope="module")
def shakespeare() -> str:
    path = SHARED / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.fail(f"{path} not found: the shared data folder must sit beside the repo (see its README)")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe(shakespeare):
    docs = shakespeare.split("\n\n")
    return build_tokenizer(TokenizeConfig(kind="bpe", vocab_size=512), lambda: iter(docs))


def hf_folder(tmp_path: Path, eos: str | None = "</s>", bos: bool = False, added: list[str] = ()) -> Path:
    """A tiny transformers tokenizer folder: byte-level BPE trained on a few sentences.

    bos: it starts every text with <s>, as Llama's and Gemma's do; added: extra special tokens a user added.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    folder = tmp_path / "hf_tok"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **({"eos_token": eos} if eos else {}), **({"bos_token": "<s>"} if bos else {}))
    if added:
        fast.add_special_tokens({"additional_special_tokens": list(added)})
    fast.save_pretrained(folder)
    return folder


def expected_documents(encode, docs, eot):
    ids = []
    for doc in docs:
        ids += encode(doc) + [eot]
    return ids


# -------------------------------------------------------------------------------------------- tiktoken


def test_tiktoken_gpt2_basics():
    tok = build_tokenizer(TokenizeConfig(kind="tiktoken", encoding="gpt2"), lambda: iter(()))
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("tiktoken", 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    literal = f"a {EOT} b"
    assert tok.eot_id not in tok.encode(literal)
    assert tok.decode(tok.encode(literal)) == literal


def test_tiktoken_documents_equal_encode_ordinary(shakespeare):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    tok = TiktokenTokenizer("gpt2")
    docs = shakespeare.split("\n\n")
    want = expected_documents(enc.encode_ordinary, docs, enc.eot_token)
    assert tok.encode_documents(docs).tolist() == want
    assert tok.encode_documents([shakespeare]).tolist() == enc.encode_ordinary(shakespeare) + [enc.eot_token]
    # A document holding the literal special string keeps it as text (the per-document fallback).
    docs = ["before", f"x {EOT} y", "", "after"]
    assert tok.encode_documents(docs).tolist() == expected_documents(enc.encode_ordinary, docs, enc.eot_token)
    assert tok.encode_documents([]).size == 0


def test_tiktoken_unknown_encoding():
    with pytest.raises(UserError, match="tokenize.encoding.*unknown.*'nope'.*cl100k_base"):
        TiktokenTokenizer("nope")


def test_tiktoken_offline_without_cache(monkeypatch, tmp_path):
    import requests
    import tiktoken.load
    import tiktoken.registry

    def offline(url):
        raise requests.exceptions.ConnectionError(f"Failed to resolve host for {url}")

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings loaded by other tests
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="'gpt2' could not be loaded.*TIKTOKEN_CACHE_DIR.*cache files.*online"):
        TiktokenTokenizer("gpt2")


# ------------------------------------------------------------------------------------------------ char


def test_char_vocabulary_and_round_trip(shakespeare):
    tok = build_tokenizer(TokenizeConfig(kind="char", unknown_chars="error"), lambda: iter(shakespeare.split("\n\n")))
    assert tok.vocab_size == 65 + 1  # the 65 characters of tiny Shakespeare, then EOT
    assert tok.eot_id == 65 and tok.decode([tok.eot_id]) == EOT
    assert tok.encode("\n !") == [0, 1, 2]  # sorted by code point
    text = shakespeare[:5000]
    assert tok.decode(tok.encode(text)) == text


def test_char_special_token_text_is_ordinary():
    tok = CharTokenizer(set(EOT), "error")
    assert tok.encode(EOT) == [tok.chars.index(c) for c in EOT]
    assert tok.decode(tok.encode(EOT)) == EOT


def test_char_unknown_error():
    tok = CharTokenizer("abc", "error")
    with pytest.raises(UserError, match=r"'é' \(U\+00E9\) is absent from the train split.*unknown_chars"):
        tok.encode("abé")


def test_char_unknown_skip_counts():
    tok = CharTokenizer("abc ", "skip")
    assert tok.vocab_size == 5 and tok.unk_id is None
    assert tok.decode(tok.encode("a😀b c!")) == "ab c"
    assert tok.describe()["unknown_chars_skipped"] == 2
    docs = ["ab", "", "xcx", "zz", "a c"]
    assert tok.decode(tok.encode_documents(docs).tolist()) == f"ab{EOT}{EOT}c{EOT}{EOT}a c{EOT}"
    assert tok.describe()["unknown_chars_skipped"] == 2 + 4
    assert tok.encode_documents([]).size == 0 and tok.encode_documents(["x", "y"]).tolist() == [4, 4]
    assert tok.encode_documents(docs).tolist() == expected_documents(tok.encode, docs, tok.eot_id)


def test_char_unknown_unk():
    tok = CharTokenizer("abc", "unk")
    assert (tok.vocab_size, tok.eot_id, tok.unk_id) == (5, 3, 4)
    assert tok.encode("axb\U0010FFFF") == [0, 4, 1, 4]
    assert tok.decode(tok.encode("axb")) == "a<unk>b"
    assert tok.describe()["unknown_chars_as_unk"] == 3


# ------------------------------------------------------------------------------------------------- bpe


def test_bpe_vocab_and_round_trip(bpe, shakespeare):
    assert bpe.kind == "bpe" and bpe.vocab_size == 512 and bpe.eot_id == 0
    ids = bpe.encode(SAMPLE)  # byte-level: characters never seen in training still round-trip
    assert max(ids) < bpe.vocab_size
    assert bpe.decode(ids) == SAMPLE
    text = shakespeare[:10000]
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and len(ids) < 0.6 * len(text)  # merges learnt


def test_bpe_small_corpus_gives_fewer_tokens_than_asked():
    tok = build_tokenizer(TokenizeConfig(kind="bpe", vocab_size=4096, min_frequency=1), lambda: iter(["tiny corpus"]))
    assert 257 < tok.vocab_size < 4096
    assert tok.describe()["requested_vocab_size"] == 4096


def test_bpe_special_token_text_is_ordinary(bpe):
    literal = f"one{EOT}two {EOT}"
    ids = bpe.encode(literal)
    assert bpe.eot_id not in ids
    assert bpe.decode(ids) == literal
    docs = ["a", literal, ""]
    assert bpe.encode_documents(docs).tolist() == expected_documents(bpe.encode, docs, bpe.eot_id)


def test_bpe_folder_loads_in_transformers(bpe, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe.save(tmp_path)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast.encode("To be, or not to be", add_special_tokens=False) == bpe.encode("To be, or not to be")
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.eos_token_id == bpe.eot_id


# -------------------------------------------------------------------------------------------------- hf


def test_hf_round_trip(tmp_path):
    tok = build_tokenizer(TokenizeConfig(kind="hf", pretrained=str(hf_folder(tmp_path)), parse_special=False), lambda: iter(()))
    assert tok.kind == "hf" and tok.eot_id == 0 and 257 < tok.vocab_size == len(tok.tok) <= 300
    text = "the lazy fox, 日本 </s> jumps"
    ids = tok.encode(text)
    assert tok.eot_id not in ids  # parse_special=false: the eos string in text stays text, and no BOS/EOS is added
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "dog"]) == [ids, tok.encode("dog")]


def test_an_added_special_token_is_one_id_unless_the_text_is_untrusted(tmp_path):
    folder = hf_folder(tmp_path, added=["<sep>"])
    tok = build_tokenizer(TokenizeConfig(kind="hf", pretrained=str(folder)), lambda: iter(()))
    sep = tok.tok.convert_tokens_to_ids("<sep>")
    ids = tok.encode("the fox<sep>the dog")
    assert ids.count(sep) == 1 and tok.decode(ids) == "the fox<sep>the dog"  # as AutoTokenizer reads run_clm's data
    plain = build_tokenizer(TokenizeConfig(kind="hf", pretrained=str(folder), parse_special=False), lambda: iter(()))
    assert sep not in plain.encode("the fox<sep>the dog")
    assert load_tokenizer(save(tok, tmp_path / "a")).encode("x<sep>y") == tok.encode("x<sep>y")
    assert load_tokenizer(save(plain, tmp_path / "b")).encode("x<sep>y") == plain.encode("x<sep>y")


def save(tok, folder: Path) -> Path:
    tok.save(folder)
    return folder


def test_documents_start_with_bos_where_the_tokenizer_adds_one(tmp_path):
    tok = build_tokenizer(TokenizeConfig(kind="hf", pretrained=str(hf_folder(tmp_path, bos=True))), lambda: iter(()))
    bos = tok.tok.bos_token_id
    assert tok.add_bos and tok.bos_id == bos
    ids = tok.encode_documents(["the fox", "the dog", "lazy"]).tolist()
    assert ids == [bos, *tok.encode("the fox"), tok.eot_id, bos, *tok.encode("the dog"), tok.eot_id, bos, *tok.encode("lazy"), tok.eot_id]
    assert tok.encode_prompt("the") == [bos, *tok.encode("the")]
    assert load_tokenizer(save(tok, tmp_path / "saved")).encode_documents(["the fox"]).tolist() == ids[: ids.index(tok.eot_id) + 1]
    off = build_tokenizer(TokenizeConfig(kind="hf", pretrained=str(hf_folder(tmp_path, bos=True)), add_bos=False), lambda: iter(()))
    assert bos not in off.encode_documents(["the fox"]).tolist()
    gpt2_style = build_tokenizer(TokenizeConfig(kind="hf", pretrained=str(hf_folder(tmp_path / "g"))), lambda: iter(()))
    assert not gpt2_style.add_bos  # auto: only where the tokenizer adds one itself


def test_add_bos_true_on_a_kind_without_one_uses_end_of_text(tmp_path):
    tok = build_tokenizer(TokenizeConfig(kind="char", add_bos=True), lambda: iter(["ab"]))
    assert tok.encode_documents(["ab", "b"]).tolist() == [2, 0, 1, 2, 2, 1, 2]  # EOT a b EOT EOT b EOT, as build-nanogpt's shards


def test_hf_without_eos(tmp_path):
    with pytest.raises(UserError, match="has no eos_token"):
        HfTokenizer(str(hf_folder(tmp_path, eos=None)))


@pytest.mark.parametrize("name", ["/no/such/tokenizer", "./missing_tok", "data/no/such/tokenizer"])
def test_hf_missing_folder(name):
    with pytest.raises(UserError, match="tokenize.pretrained.*not found"):
        HfTokenizer(name)


# ------------------------------------------------------------------------------------------- save/load


@pytest.mark.parametrize("kind", ["tiktoken", "char", "bpe", "hf"])
def test_save_load_round_trip(kind, tmp_path, shakespeare, bpe):
    docs = shakespeare[:20000].split("\n\n")
    if kind == "bpe":
        tok = bpe
    else:
        pretrained = str(hf_folder(tmp_path)) if kind == "hf" else None
        tok = build_tokenizer(TokenizeConfig(kind=kind, pretrained=pretrained), lambda: iter(docs))
    tok.save(tmp_path / "saved")
    loaded = load_tokenizer(tmp_path / "saved")
    assert type(loaded) is type(tok)
    assert (loaded.vocab_size, loaded.eot_id) == (tok.vocab_size, tok.eot_id)
    text = "the quick brown fox" if kind == "hf" else docs[3]
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text)) == text
    assert np.array_equal(loaded.encode_documents([text, text]), tok.encode_documents([text, text]))


def test_load_tokenizer_not_a_folder(tmp_path):
    with pytest.raises(UserError, match="tokenizer_meta.json not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text('{"kind": "mystery"}')
    with pytest.raises(UserError, match="malformed"):
        load_tokenizer(tmp_path)


def test_hf_hub_unreachable(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, never touch the network
    with pytest.raises(UserError, match="could not load tokenizer 'no-such-org/no-such-tok'.*local folder.*HF_HUB_OFFLINE"):
        HfTokenizer("no-such-org/no-such-tok")
