"""Models from scratch and from checkpoints, and fine-tuning a tiny pretrained checkpoint end to end."""

import math

import pytest
import torch
from conftest import TINY_TRAIN, logged
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from pipeline import params
from pipeline.config.model import ModelConfig
from pipeline.errors import UserError
from pipeline.model.build import build_model, count_params, padded_vocab
from pipeline.prepare.stage import prepare_corpus
from pipeline.tokenize.stage import tokenize_corpus
from pipeline.train.loop import train


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_fresh_scratch_model_predicts_uniformly(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=16), vocab_size=5000, eot_id=0)
    assert model.config.vocab_size == padded_vocab(5000) == 5056  # a multiple of 64 (a small vocabulary: of 8)
    assert padded_vocab(65) == 72
    ids = torch.randint(0, 5000, (4, 16))
    loss = model(input_ids=ids, labels=ids).loss.item()
    assert abs(loss - math.log(5056)) < 0.2


def test_presets_give_gpt2_shapes():
    cfg = ModelConfig(preset="gpt2-124m")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=50257, eot_id=50256)
    # GPT-2 small: 124M parameters with the vocabulary padded to 50304.
    assert 124e6 < count_params(model) < 125e6


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"model.init=.*cannot load this folder"):
        build_model(ModelConfig(init=str(tmp_path)), vocab_size=100, eot_id=0)


def save_tiny_checkpoint(folder, arch: str, corpus: list[str]) -> int:
    """A tiny pretrained-style checkpoint with its own BPE tokenizer; returns the tokenizer's size."""
    eos = "<|endoftext|>" if arch == "gpt2" else "</s>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos)
    hf_tok.add_special_tokens({"additional_special_tokens": ["<|added|>"]})  # one more token than the embeddings have
    hf_tok.save_pretrained(folder)
    n_embeddings = len(hf_tok) - 1
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=n_embeddings, n_positions=64, n_embd=32, n_layer=2, n_head=2, eos_token_id=hf_tok.eos_token_id)
    else:
        cfg = LlamaConfig(
            vocab_size=n_embeddings, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, eos_token_id=hf_tok.eos_token_id, tie_word_embeddings=False,
        )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return len(hf_tok)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fine_tune_a_tiny_pretrained_checkpoint_end_to_end(tmp_path, shared_data, arch, capsys):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:60_000]
    docs = text.split("\n\n")
    pretrained = tmp_path / "pretrained"
    n_tokens = save_tiny_checkpoint(pretrained, arch, docs)
    (tmp_path / "corpus.txt").write_text(text)
    p = params.validate_params(
        {
            "prepare": {"source": {"kind": "files", "path": str(tmp_path / "corpus.txt"), "separator": "\n\n"}, "out_dir": str(tmp_path / "prepared")},
            "tokenize": {"kind": "hf", "pretrained": str(pretrained), "out_dir": str(tmp_path / "tokens")},
            # Llama: its attention dropout set by model.dropout; remote code allowed (the log must say so).
            "model": {"init": str(pretrained), "block_size": 32, **({"dropout": 0.1, "trust_remote_code": True} if arch == "llama" else {})},
            "train": {
                **TINY_TRAIN, "max_steps": 12, "lr": 2e-3, "out_dir": str(tmp_path / "ckpt"),
                "export_dir": str(tmp_path / "final"), "metrics_dir": str(tmp_path / "metrics"),
            },
        }
    )  # fmt: skip
    prepare_corpus(p.prepare)
    tokenize_corpus(p.tokenize, p.prepare.out_dir)
    train(p)
    losses = logged(tmp_path, "train/loss")
    assert losses[-1] < losses[0]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert model.config.model_type == arch
    trust_line = "model.trust_remote_code is on: running the modelling code that ships with"
    if arch == "llama":
        assert model.config.attention_dropout == 0.1
        assert trust_line in capsys.readouterr().out
    else:
        assert trust_line not in capsys.readouterr().out
    assert model.get_input_embeddings().weight.shape[0] >= n_tokens  # resized for the added token
    ids = tokenizer("ROMEO: good night", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "ROMEO: good night"
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_pretrained_model_needs_its_own_tokenizer():
    with pytest.raises(UserError, match=r"tokenize.kind: is 'bpe' but model.init='gpt2' is no folder here, so it names a model on the Hugging Face hub .*: its own tokenizer is needed"):
        params.validate_params({"model": {"init": "gpt2"}})
