"""Evaluation on tiny real transformers models: val metrics against plain transformers, rank splits, HellaSwag."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline import params
from pipeline.config.tokenize import TokenizeConfig
from pipeline.errors import UserError
from pipeline.eval.hellaswag import Item, accuracy_counts, encode_pair, hellaswag_scores, parse_hellaswag
from pipeline.eval.lm import covered_text_bytes, val_metrics, val_sums
from pipeline.eval.stage import evaluate_model as evaluate
from pipeline.model.build import padded_vocab
from pipeline.model.inference import load_for_inference
from pipeline.tokenize.tokenizers import BpeTokenizer, build_tokenizer
from pipeline.tokens import open_tokens, write_tokens

SENTENCE = "the cat sat on the mat. "


def char_tokenizer(text: str = SENTENCE + "dogé"):
    return build_tokenizer(TokenizeConfig(kind="char"), lambda: [text])


def tiny_gpt2(tok, n_positions: int = 64, n_layer: int = 1, seed: int = 0, vocab: int | None = None, **kwargs) -> GPT2LMHeadModel:
    """A random GPT-2 for tokenizer tok with the vocabulary padded as the train stage pads it (or to vocab)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=2, n_embd=32, n_positions=n_positions, vocab_size=vocab or padded_vocab(tok.vocab_size),
                     bos_token_id=tok.eot_id, eos_token_id=tok.eot_id, **kwargs)
    return GPT2LMHeadModel(cfg).eval()


def save_model_dir(folder: Path, model, tokenizer) -> Path:
    """What the export writes, in small: the transformers folder plus gptpipe_tokenizer/."""
    model.save_pretrained(folder)
    tokenizer.save(folder / "gptpipe_tokenizer")
    return folder


def reference_sums(model, tokens: np.ndarray, block_size: int) -> tuple[float, int, int]:
    """(summed loss, correct argmax, predictions) from transformers' own loss, window by window."""
    loss = correct = count = 0
    for start in range(0, len(tokens) - 1, block_size):
        w = torch.tensor(tokens[start : start + block_size + 1].astype(np.int64))[None]
        with torch.no_grad():
            out = model(input_ids=w, labels=w)  # transformers shifts the labels itself
        n = w.shape[1] - 1
        loss += out.loss.item() * n
        correct += int((out.logits[0, :-1].argmax(-1) == w[0, 1:]).sum())
        count += n
    return loss, correct, count


@pytest.fixture(scope="module")
def val_file(tmp_path_factory):
    """101 random ids of a 22-id tokenizer as a token file: 100 predictions, so windows of 16 end with a short one."""
    tok = char_tokenizer()
    ids = np.random.default_rng(0).integers(0, tok.vocab_size, size=101)
    path = tmp_path_factory.mktemp("val") / "val.bin"
    write_tokens(path, ids, tok.vocab_size, tok.eot_id)
    return tok, open_tokens(path).tokens


def test_val_metrics_equal_plain_transformers_over_the_same_windows(val_file):
    tok, tokens = val_file
    model = tiny_gpt2(tok)
    got = val_metrics(model, tokens, block_size=16, batch_size=3, text_bytes=250)
    loss, correct, count = reference_sums(model, tokens, 16)
    assert got["tokens_scored"] == count == 100
    assert got["val_loss"] == pytest.approx(loss / count, rel=1e-5)
    assert got["val_loss"] == pytest.approx(math.log(padded_vocab(tok.vocab_size)), rel=0.05)  # fresh: about uniform over the padded vocab
    assert got["perplexity"] == pytest.approx(math.exp(loss / count), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(loss / math.log(2) / 250, rel=1e-5)
    assert got["token_accuracy"] == correct / count
    assert val_metrics(model, tokens, 16, 3, 250) == got  # deterministic


def test_two_ranks_sum_to_one_rank_and_max_windows_truncates(val_file):
    tok, tokens = val_file
    model = tiny_gpt2(tok)
    for max_windows in (None, 5):
        whole = val_sums(model, tokens, 16, 2, max_windows)
        rank0, rank1 = (val_sums(model, tokens, 16, 2, max_windows, rank=r, world_size=2) for r in (0, 1))
        halves = rank0 + rank1
        assert (halves.tokens, halves.correct) == (whole.tokens, whole.correct)
        assert halves.loss == pytest.approx(whole.loss, rel=1e-6)
    assert val_sums(model, tokens, 16, 2, max_windows=5).tokens == 5 * 16
    loss, _, _ = reference_sums(model, tokens[: 5 * 16 + 1], 16)
    assert val_sums(model, tokens, 16, 4, max_windows=5).loss == pytest.approx(loss, rel=1e-5)


def test_covered_text_bytes_counts_utf8_bytes_and_no_end_of_text():
    tok = char_tokenizer()
    ids = tok.encode_documents(["the dog é", "cat"])  # é is 2 bytes; EOT after each document
    assert covered_text_bytes(tok, ids) == len("the dog é".encode()) + 3 == 13
    assert covered_text_bytes(tok, ids[:4]) == 4


def write_tokens_dir(folder: Path, tok, docs: list[str]) -> Path:
    """val-00000.bin and the part of meta.json evaluate reads."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = tok.encode_documents(docs)
    write_tokens(folder / "val-00000.bin", ids, tok.vocab_size, tok.eot_id)
    meta = {"vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "splits": {"val": {"tokens": len(ids), "text_bytes": sum(len(d.encode()) for d in docs)}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_evaluate_stage_writes_numeric_metrics_and_notes(tmp_path):
    tok = char_tokenizer()
    model_dir = save_model_dir(tmp_path / "model", tiny_gpt2(tok, n_positions=32), tok)
    tokens_dir = write_tokens_dir(tmp_path / "tokens", tok, [SENTENCE] * 10)  # 25 ids per document
    hellaswag = tmp_path / "hs.jsonl"
    item = {"ctx": "the cat", "endings": ["sat", "dog", "mat"]}
    hellaswag.write_text("".join(json.dumps({**item, "label": i % 3}) + "\n" for i in range(5)))
    raw = {
        "tokenize": {"kind": "char", "out_dir": str(tokens_dir)},
        "model": {"block_size": 64},
        "train": {"export_dir": str(model_dir)},
        "evaluate": {"batch_size": 4, "metrics_file": str(tmp_path / "reports" / "metrics.json")},
    }
    m = evaluate(params.validate_params(raw))
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text()) == m
    assert m["val"]["tokens"] == 249
    assert m["val"]["bits_per_byte"] == pytest.approx(m["val"]["loss"] * 249 / math.log(2) / 240)
    assert "hellaswag" not in m and "hellaswag: skipped (evaluate.hellaswag not set)" in m["notes"]
    assert any("capped at the model's context of 32" in n for n in m["notes"])
    n_params = sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(model_dir).parameters())
    assert m["model"] == {"parameters": n_params, "dir": str(model_dir)}

    raw["evaluate"].update(max_windows=2, hellaswag=str(hellaswag), hellaswag_limit=4)
    m = evaluate(params.validate_params(raw))
    assert m["val"]["tokens"] == 64
    # The two windows cover ids 0..64: two sentences and a half (24 bytes each) and two EOTs.
    assert m["val"]["bits_per_byte"] == pytest.approx(m["val"]["loss"] * 64 / math.log(2) / 63)
    assert m["hellaswag"]["n"] == 4 and 0 <= m["hellaswag"]["acc"] <= 1


def test_a_missing_model_folder_says_to_run_train(tmp_path):
    with pytest.raises(UserError, match=r"train.export_dir: .*nowhere not found; run the train stage"):
        load_for_inference(tmp_path / "nowhere", key="train.export_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        load_for_inference(tmp_path / "empty")


def test_a_plain_hugging_face_folder_loads_with_its_own_tokenizer(tmp_path):
    bpe = BpeTokenizer.train([SENTENCE * 20], vocab_size=300, min_frequency=1)
    tiny_gpt2(bpe).save_pretrained(tmp_path)
    bpe._save(tmp_path)  # tokenizer.json and tokenizer_config.json only, as any Hugging Face folder
    model, tok = load_for_inference(tmp_path)
    assert tok.kind == "hf" and tok.eot_id == bpe.eot_id and tok.encode(SENTENCE) == bpe.encode(SENTENCE)
    assert not model.training


# -------------------------------------------------------------------------------------------- HellaSwag


def test_both_formats_parse_to_lm_eval_harness_queries(tmp_path):
    original = {
        "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a sink [title] Rinse the sink.",
        "ctx_b": "then scrub IT", "endings": ["[step] Use soap  and water.", " dry it [title] Done"], "label": "1",
    }  # fmt: skip
    # By hand, following lm-eval's preprocess: " [title]" -> ". ", tags removed, double spaces collapsed once;
    # the text is stripped before the tags go, so "[step] Use" keeps its space.
    query = "Home and Garden: How to clean a sink. Rinse the sink. Then scrub it"
    endings = [" Use soap and water.", "dry it. Done"]
    preprocessed = {"ctx": query, "endings": endings, "label": 1}
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(original) + "\n\n" + json.dumps(preprocessed) + "\n")
    assert parse_hellaswag(path) == [Item(query, endings, 1)] * 2
    assert parse_hellaswag([json.dumps(preprocessed)]) == [Item(query, endings, 1)]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "malformed JSON"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', "'label' must be an index"),
        ('{"ctx": "a", "endings": "bc", "label": 0}', "'endings' must be a list"),
        ('{"endings": ["b", "c"], "label": 0}', "needs 'ctx'"),
    ],
)
def test_a_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "hs.jsonl"
    path.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"hs.jsonl:2: {message}"):
        parse_hellaswag(path)


def test_the_shared_sample_parses(shared_data):
    items = parse_hellaswag(shared_data / "hellaswag_val_sample.jsonl")
    assert len(items) == 100
    assert all(len(i.endings) == 4 and 0 <= i.label < 4 and i.query for i in items)


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    tok = char_tokenizer()
    context, continuation = encode_pair(tok, "the cat ", "sat")
    assert (context, continuation) == (tok.encode("the cat"), tok.encode(" sat"))
    assert encode_pair(tok, "", "cat") == ([tok.eot_id], tok.encode("cat"))


def test_acc_norm_divides_by_the_length_of_the_ending():
    items = [Item("q", ["ab", "abcdefgh"], 1)]
    # Summed: -10 > -12 picks the short ending; per character: -10/2 = -5 < -12/8 = -1.5 picks the long one.
    assert accuracy_counts(items, [[-10.0, -12.0]]) == {"correct": 0, "correct_norm": 1, "n": 1}


def trained_on_sentence(tok, steps: int = 150) -> GPT2LMHeadModel:
    """A 2-layer model trained until it continues the repeated sentence."""
    model = tiny_gpt2(tok, n_layer=2).train()
    ids = torch.tensor(tok.encode(SENTENCE * 12))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=gen)
        batch = torch.stack([ids[s : s + 33] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_a_model_trained_on_the_sentence_picks_its_ending():
    tok = char_tokenizer()
    model = trained_on_sentence(tok)
    items = [
        Item("the cat sat on the", ["mat.", "cat."], 0),
        Item("the cat sat on", ["the cat.", "the mat."], 1),
        Item("the cat", ["sat on the mat.", "mat on the sat.", "dog"], 0),
        Item("the cat sat", ["on the dog.", "on the mat."], 1),
    ]
    assert hellaswag_scores(model, tok, items, batch_size=3) == {"acc": 1.0, "acc_norm": 1.0, "n": 4}
    # Left truncation: a model with a 16-token context scores queries longer than it.
    short = tiny_gpt2(tok, n_positions=16)
    assert hellaswag_scores(short, tok, [Item(SENTENCE * 2 + "the", ["mat.", "cat."], 0)], 2)["n"] == 1


def test_your_own_metrics_run_beside_the_built_in_ones(tmp_path, monkeypatch):
    """Issue 21: evaluate.metrics, module:function from the project folder, called with the model, tokenizer and val
    tokens; a number or a dict of numbers lands in metrics.json beside val and hellaswag."""
    tok = char_tokenizer()
    model_dir = save_model_dir(tmp_path / "model", tiny_gpt2(tok, n_positions=32), tok)
    tokens_dir = write_tokens_dir(tmp_path / "tokens", tok, [SENTENCE] * 4)
    (tmp_path / "project_metrics_a.py").write_text(
        "import torch\n\n"
        "def eot_share(model, tokenizer, val_tokens):\n"
        "    return float((val_tokens == tokenizer.eot_id).mean())\n\n"
        "def first_logit(model, tokenizer, val_tokens):\n"
        "    x = torch.from_numpy(val_tokens[:4].astype('int64'))[None]\n"
        "    return {'logit': model(input_ids=x).logits[0, -1, 0], 'vocab': tokenizer.vocab_size}\n\n"
        "def broken(model, tokenizer, val_tokens):\n"
        "    return {'x': 1} / 2\n\n"
        "def words(model, tokenizer, val_tokens):\n"
        "    return 'many'\n"
    )
    monkeypatch.chdir(tmp_path)
    raw = {"tokenize": {"kind": "char", "out_dir": str(tokens_dir)}, "model": {"block_size": 32}, "train": {"export_dir": str(model_dir)},
           "evaluate": {"metrics_file": str(tmp_path / "metrics.json"), "metrics": ["project_metrics_a:eot_share", "project_metrics_a:first_logit"]}}
    m = evaluate(params.validate_params(raw))
    assert m["eot_share"] == {"value": pytest.approx(4 / 100)}
    assert m["first_logit"]["vocab"] == tok.vocab_size and isinstance(m["first_logit"]["logit"], float)
    assert json.loads((tmp_path / "metrics.json").read_text())["eot_share"] == m["eot_share"] and "val" in m

    for name, message in [
        ("project_metrics_a:broken", r"project_metrics_a:broken raised TypeError: .* \(.*project_metrics_a.py:11\)"),
        ("project_metrics_a:words", r"returned str; return a number or a dict of names to numbers"),
        ("project_metrics_a:missing", r"project_metrics_a \(.*project_metrics_a.py\) has no function 'missing'"),
        ("no_such_module:f", r"evaluate.metrics: no module 'no_such_module' in .* \(a file no_such_module.py there\)"),
    ]:
        raw["evaluate"]["metrics"] = [name]
        with pytest.raises(UserError, match=message):
            evaluate(params.validate_params(raw))
