"""Sampling from tiny real transformers models: seeds, greedy against a cache-free loop, filters, stopping, reports."""

import json

import pytest
import torch
from test_evaluation import char_tokenizer, save_model_dir, tiny_gpt2
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import params
from pipeline.errors import UserError
from pipeline.model.build import context_length
from pipeline.model.generate import filter_logits, sample_tokens
from pipeline.sample.stage import generate_samples, write_samples

INF = float("-inf")


def sample(model, tok, prompt: str = "the cat", seed: int = 0, **settings) -> list[int]:
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=None, top_p=1.0, eot_id=tok.eot_id, stop_at_eot=False,
                  vocab_size=tok.vocab_size)
    kwargs.update(settings)
    return sample_tokens(model, tok.encode(prompt), generator=torch.Generator().manual_seed(seed), **kwargs)


def test_the_same_seed_gives_the_same_text_and_another_seed_another():
    tok = char_tokenizer()
    model = tiny_gpt2(tok)
    first = sample(model, tok, seed=1)
    assert len(first) == 20 and all(0 <= i < tok.vocab_size for i in first)
    assert sample(model, tok, seed=1) == first
    assert sample(model, tok, seed=2) != first  # about uniform over 22 ids: 20 equal draws are 22**-20 likely


def greedy_without_cache(model, ids: list[int], steps: int, vocab_size: int) -> list[int]:
    """Argmax decoding the slow way: the whole (cropped) context through the model at every step."""
    context, new = list(ids), []
    for _ in range(steps):
        window = torch.tensor([context[-context_length(model.config) :]])
        with torch.no_grad():
            logits = model(input_ids=window, use_cache=False).logits[0, -1]
        new.append(int(logits[:vocab_size].argmax()))
        context.append(new[-1])
    return new


def tiny_llama(tok, max_positions: int, **kwargs) -> LlamaForCausalLM:
    torch.manual_seed(3)
    cfg = LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=32, intermediate_size=64,
                      max_position_embeddings=max_positions, vocab_size=64, bos_token_id=tok.eot_id,
                      eos_token_id=tok.eot_id, **kwargs)
    return LlamaForCausalLM(cfg).eval()


# A context of 16 positions is outgrown and cropped; larger initial weights make the greedy path varied.
@pytest.mark.parametrize("arch, n_positions", [("gpt2", 64), ("gpt2", 16), ("llama", 16)])
def test_temperature_zero_is_the_greedy_path_of_a_loop_without_cache(arch, n_positions):
    tok = char_tokenizer()
    if arch == "gpt2":
        model = tiny_gpt2(tok, n_positions=n_positions, seed=3, initializer_range=0.5)
    else:
        model = tiny_llama(tok, n_positions, initializer_range=0.5)
    prompt = "the cat sat on"
    got = sample(model, tok, prompt, temperature=0.0, max_new_tokens=25)
    assert got == greedy_without_cache(model, tok.encode(prompt), 25, tok.vocab_size)
    assert len(set(got)) > 3  # a path that tests something


def test_padded_vocabulary_ids_are_never_sampled():
    tok = char_tokenizer()  # 16 ids; the model below has 24 outputs, as padding gives a larger vocabulary
    model = constant_model(tok, {20: 1.0, 5: 0.5}, vocab=24)  # padding id 20 has the highest logit, then id 5
    assert sample(model, tok, max_new_tokens=5, temperature=0.0) == [5] * 5
    assert all(i < tok.vocab_size for i in sample(model, tok, max_new_tokens=30, temperature=2.0))


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.5])
    kept = filter_logits(logits, top_k=2, top_p=None)
    assert torch.isfinite(kept).sum() == 2 and set(kept[torch.isfinite(kept)].tolist()) == {3.0}
    assert torch.equal(filter_logits(logits, top_k=5, top_p=None), logits)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.12, 0.5, 0.05, 0.25, 0.08])
    logits = probs.log()
    # Most likely first, the cumulative probability is 0.5, 0.75, 0.87, 0.95, 1.
    assert filter_logits(logits, None, 0.3).isfinite().tolist() == [False, True, False, False, False]  # at least one
    assert filter_logits(logits, None, 0.7).isfinite().tolist() == [False, True, False, True, False]
    assert filter_logits(logits, None, 0.76).isfinite().tolist() == [True, True, False, True, False]
    assert filter_logits(logits, None, 0.9).isfinite().tolist() == [True, True, False, True, True]
    kept = filter_logits(logits, None, 0.9)
    assert torch.equal(kept[kept.isfinite()], logits[[0, 1, 3, 4]])  # the survivors keep their values
    assert torch.equal(filter_logits(logits, None, 1.0), logits)


def test_top_k_then_top_p_renormalises_over_the_k():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # After top_k=2 the nucleus sees 0.4/0.7 = 0.57 and 0.3/0.7 = 0.43: top_p 0.5 keeps only the first.
    assert filter_logits(probs.log(), 2, 0.5).isfinite().tolist() == [True, False, False, False]
    assert filter_logits(probs.log(), 2, 0.6).isfinite().tolist() == [True, True, False, False]
    assert filter_logits(torch.stack([probs.log(), probs.flip(0).log()]), 1, 0.9).isfinite().sum(-1).tolist() == [1, 1]


def constant_model(tok, rows: dict[int, float], vocab: int | None = None):
    """A model with the same logits at every position: 32 * rows[id] for the ids in rows, 0 for the rest.

    The final layer norm outputs a constant vector of ones (n_embd 32), which the output rows then weigh.
    """
    model = tiny_gpt2(tok, tie_word_embeddings=False, vocab=vocab)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        for i, value in rows.items():
            model.lm_head.weight[i] = value
    return model


def eot_model(tok):
    return constant_model(tok, {tok.eot_id: 1.0})  # end-of-text: e**32 times likelier than any other id


def test_generation_stops_at_end_of_text_and_leaves_it_out():
    tok = char_tokenizer()
    model = eot_model(tok)
    assert sample(model, tok, stop_at_eot=True) == []
    assert sample(model, tok, stop_at_eot=False, max_new_tokens=3) == [tok.eot_id] * 3


def test_generate_samples_and_the_reports(tmp_path):
    tok = char_tokenizer()
    model_dir = save_model_dir(tmp_path / "model", tiny_gpt2(tok), tok)
    raw = {"tokenize": {"kind": "char"}, "sample": {"model_dir": str(model_dir), "prompts": ["the cat", "```dog"],
           "num_samples": 2, "max_new_tokens": 6, "seed": 7, "stop_at_eot": False}}  # fmt: skip
    p = params.validate_params(raw)
    samples = generate_samples(p, device="cpu")
    assert [(s["prompt"], s["index"]) for s in samples] == [("the cat", 0), ("the cat", 1), ("```dog", 0), ("```dog", 1)]
    assert all(s["tokens"] == 6 and s["text"] and not s["stopped_at_eot"] for s in samples)
    assert [s["text"] for s in generate_samples(p, device="cpu")] == [s["text"] for s in samples]

    write_samples(samples, tmp_path / "reports", {"temperature": 0.8, "seed": 7})
    lines = (tmp_path / "reports" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == samples
    md = (tmp_path / "reports" / "samples.md").read_text()
    assert "- **seed**: `7`" in md and '## Prompt 1: "the cat"' in md and '## Prompt 2: "```dog"' in md
    assert f"````\n```dog{samples[2]['text']}\n````" in md  # a longer fence around text holding one

    stopped = save_model_dir(tmp_path / "eot", eot_model(tok), tok)
    p.sample.stop_at_eot = True
    s = generate_samples(p, prompts=["x"], model_dir=str(stopped), device="cpu")
    assert [(x["text"], x["tokens"], x["stopped_at_eot"]) for x in s] == [("", 0, True)] * 2


def test_prompts_come_from_the_prompts_file(tmp_path):
    tok = char_tokenizer()
    model_dir = save_model_dir(tmp_path / "model", tiny_gpt2(tok), tok)
    (tmp_path / "prompts.txt").write_text("the cat\n\nthe mat\n")
    raw = {"sample": {"model_dir": str(model_dir), "prompts_file": str(tmp_path / "prompts.txt"), "num_samples": 1,
           "max_new_tokens": 2}}  # fmt: skip
    assert [s["prompt"] for s in generate_samples(params.validate_params(raw), device="cpu")] == ["the cat", "the mat"]
    raw["sample"]["prompts_file_format"] = "whole"  # nanoGPT's --start=FILE: the file is one prompt, newlines kept
    assert [s["prompt"] for s in generate_samples(params.validate_params(raw), device="cpu")] == ["the cat\n\nthe mat\n"]
    raw["sample"]["prompts_file"] = str(tmp_path / "missing.txt")
    with pytest.raises(UserError, match=r"sample.prompts_file: .*missing.txt not found"):
        generate_samples(params.validate_params(raw), device="cpu")


def test_sample_dtype_chooses_the_precision_of_generation(tmp_path, monkeypatch):
    import pipeline.sample.stage as stage

    tok = char_tokenizer()
    model_dir = save_model_dir(tmp_path / "model", tiny_gpt2(tok), tok)
    seen, real = [], stage.load_for_inference

    def recording(*args, **kwargs):  # the real loader; only the dtype it was asked for is noted
        model, tokenizer = real(*args, **kwargs)
        seen.append(next(model.parameters()).dtype)
        return model, tokenizer

    monkeypatch.setattr(stage, "load_for_inference", recording)
    raw = {"sample": {"model_dir": str(model_dir), "prompts": ["the"], "num_samples": 1, "max_new_tokens": 4, "temperature": 0}}
    fp32 = generate_samples(params.validate_params(raw), device="cpu")
    raw["sample"]["dtype"] = "bf16"
    bf16 = generate_samples(params.validate_params(raw), device="cpu")
    assert seen == [torch.float32, torch.bfloat16]  # auto on a CPU: fp32
    assert fp32[0]["tokens"] == bf16[0]["tokens"] == 4


def test_a_batch_of_samples_matches_one_row_at_a_time_and_the_cache_free_path():
    from pipeline.model.generate import sample_batch

    tok = char_tokenizer()
    model = tiny_gpt2(tok, n_positions=16, seed=3, initializer_range=0.5)  # outgrows its context: crops
    args = dict(max_new_tokens=24, temperature=0.0, top_k=None, top_p=1.0, eot_id=tok.eot_id, stop_at_eot=False, vocab_size=tok.vocab_size)
    rows = sample_batch(model, tok.encode("the cat"), 3, generator=torch.Generator(), **args)
    assert rows == [sample(model, tok, temperature=0.0, max_new_tokens=24)] * 3
    assert sample_batch(model, tok.encode("the cat"), 3, generator=torch.Generator(), kv_cache=False, **args) == rows
    sampled = sample_batch(model, tok.encode("the cat"), 4, generator=torch.Generator().manual_seed(0), **{**args, "temperature": 1.0})
    assert len({tuple(r) for r in sampled}) > 1  # the rows draw their own tokens
