"""Generation: a KV-cached sampling loop with temperature, top-k and top-p, used by training's samples and the
sample stage."""

from __future__ import annotations

import torch

from pipeline.model.build import model_context


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits (..., V) with every token outside the top k, then outside the top-p nucleus, set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (at least one token).
    """
    logits = logits.clone()
    if top_k is not None and top_k < logits.size(-1):
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))  # exactly k, ties or not
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop = before >= top_p  # the set already reached top_p without this token; never the first
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator, vocab_size: int) -> torch.Tensor:
    """One id per row from the last position's logits (N, V); ids >= vocab_size (vocabulary padding) never come out."""
    logits = logits[:, :vocab_size].float().cpu()  # sampled on the CPU, where the seeded generator lives
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        # Sample among the k candidates only: the same distribution as masking the rest, without a softmax and a
        # multinomial over the whole vocabulary each step (50,257 entries for GPT-2).
        values, ids = logits.topk(top_k, dim=-1)  # (N, k)
        probs = filter_logits(values, None, top_p).softmax(dim=-1)
        return ids.gather(-1, torch.multinomial(probs, 1, generator=generator))[:, 0]
    probs = filter_logits(logits, None, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def cached_step(model, input_ids: torch.Tensor, out):
    """The model's output for input_ids (N, 1) read after the context whose KV cache out (the last output) holds.

    transformers 5 names the cache `cache`, on the output and as forward's argument; `past_key_values` still works
    but warns and goes in 5.40. A model with remote code may take past_key_values only: only when forward rejects
    `cache` as an unexpected keyword is it called the old way, so an error inside forward is never retried.
    """
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # remote code may return its own output type
    try:
        return model(input_ids=input_ids, cache=cache, use_cache=True)
    except TypeError as error:
        if "unexpected keyword argument 'cache'" not in str(error):
            raise
        return model(input_ids=input_ids, past_key_values=cache, use_cache=True)


@torch.inference_mode()
def sample_batch(model, prompt_ids: list[int], n: int, max_new_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, generator: torch.Generator, eot_id: int, stop_at_eot: bool, vocab_size: int,
                 kv_cache: bool = True) -> list[list[int]]:
    """n continuations of prompt_ids generated together, one batch row each (an empty prompt starts from end-of-text).

    With stop_at_eot a row ends at end-of-text, which is not returned; the batch stops when every row has. The
    context is cropped to the model's last max-positions tokens once it grows past them: then each step
    re-reads that window. kv_cache=False re-reads the whole context every step (the benchmark's baseline).
    """
    device = next(model.parameters()).device
    max_len = model_context(model)
    context = torch.tensor([list(prompt_ids) or [eot_id]] * n, device=device)  # (N, T)

    def read_all():
        window = context[:, -max_len:] if max_len else context
        return model(input_ids=window, use_cache=kv_cache), window.shape[1]

    out, cached = read_all()
    new = torch.empty(n, 0, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    while new.shape[1] < max_new_tokens:
        tokens = next_tokens(out.logits[:, -1], temperature, top_k, top_p, generator, vocab_size)  # (N,)
        if stop_at_eot:
            done |= tokens == eot_id
            if done.all():
                break
        new = torch.cat([new, tokens[:, None]], dim=1)
        context = torch.cat([context, tokens[:, None].to(device)], dim=1)
        if new.shape[1] == max_new_tokens:
            break
        if not kv_cache or (max_len and cached >= max_len):
            out, cached = read_all()  # learned positions can't slide: recompute the cropped window
        else:
            out = cached_step(model, tokens[:, None].to(device), out)
            cached += 1
    rows = new.tolist()
    if stop_at_eot:  # a row that stopped early keeps what it made before its end-of-text
        rows = [row[: row.index(eot_id)] if eot_id in row else row for row in rows]
    return rows


def sample_tokens(model, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
                  top_p: float | None, generator: torch.Generator, eot_id: int, stop_at_eot: bool,
                  vocab_size: int) -> list[int]:
    """The ids generated after prompt_ids: sample_batch with one row."""
    return sample_batch(model, prompt_ids, 1, max_new_tokens, temperature, top_k, top_p, generator, eot_id, stop_at_eot, vocab_size)[0]
