"""The sample stage: texts from the trained model for each prompt, written as samples.jsonl and samples.md."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.config.all import Params
from pipeline.errors import UserError
from pipeline.files import absent, write_text_atomic
from pipeline.layout import SamplesDir
from pipeline.model.build import TORCH_DTYPES, inference_dtype
from pipeline.model.generate import sample_batch
from pipeline.model.inference import load_for_inference


def read_prompts(p: Params) -> list[str]:
    """sample.prompts_file's non-empty lines (or the whole file, prompts_file_format: whole) when set, else sample.prompts."""
    cfg = p.sample
    if not cfg.prompts_file:
        return list(cfg.prompts)
    path = Path(cfg.prompts_file)
    if not path.is_file():
        raise UserError(f"sample.prompts_file: {path} {absent(path)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"sample.prompts_file: {path} is not UTF-8 text (byte {e.start})") from None
    whole = cfg.prompts_file_format == "whole"
    prompts = ([text] if text.strip() else []) if whole else [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"sample.prompts_file: {path} holds no prompt" + ("" if whole else " (one per line)"))
    return prompts


def generate_samples(p: Params, prompts: list[str] | None = None, model_dir: str | None = None,
                     device: torch.device | str | None = None) -> list[dict]:
    """sample.num_samples texts per prompt; one seeded generator for the run, so the same settings give the same text."""
    cfg = p.sample
    ref = p.model_for("sample")
    dtype = inference_dtype(p.train) if cfg.dtype == "auto" else TORCH_DTYPES[cfg.dtype]
    model, tokenizer = load_for_inference(model_dir or ref.path, device, dtype, key="--model" if model_dir else ref.key,
                                          trust_remote_code=p.model.trust_remote_code)
    generator = torch.Generator().manual_seed(cfg.seed)
    samples = []
    for prompt in prompts if prompts is not None else read_prompts(p):
        ids = tokenizer.encode_prompt(prompt)
        start = time.perf_counter()
        # A prompt's samples are generated together, one batch row each.
        rows = sample_batch(model, ids, cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator,
                            tokenizer.eot_id, cfg.stop_at_eot, tokenizer.vocab_size)
        seconds = round((time.perf_counter() - start) / cfg.num_samples, 3)
        for index, new in enumerate(rows):
            samples.append({
                "prompt": prompt,
                "index": index,
                "text": tokenizer.decode(new),
                "tokens": len(new),
                "seconds": seconds,
                # Stopping consumes a step without returning a token, so a stopped sample is always short.
                "stopped_at_eot": cfg.stop_at_eot and len(new) < cfg.max_new_tokens,
            })
    return samples


def sample_summary(p: Params, model_dir: str | None = None) -> dict:
    """The settings shown at the top of samples.md."""
    cfg = p.sample
    keys = ("num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_at_eot", "dtype")
    return {"model_dir": model_dir or p.model_for("sample").path, **{k: getattr(cfg, k) for k in keys}}


def fence(text: str) -> str:
    """A code fence longer than any run of backticks in text."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def write_samples(samples: list[dict], out_dir: str | Path, config_summary: dict) -> None:
    """samples.jsonl (one record a line) and samples.md (settings, then each prompt and its samples)."""
    out = SamplesDir(out_dir)
    write_text_atomic(out.jsonl, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    lines = ["# Samples", ""] + [f"- **{k}**: `{v}`" for k, v in config_summary.items()] + [""]
    prompts = list(dict.fromkeys(s["prompt"] for s in samples))
    for number, prompt in enumerate(prompts, 1):
        lines += [f"## Prompt {number}: {json.dumps(prompt, ensure_ascii=False)}", ""]
        for s in (s for s in samples if s["prompt"] == prompt):
            end = ", stopped at end-of-text" if s["stopped_at_eot"] else ""
            text = prompt + s["text"]
            lines += [f"Sample {s['index'] + 1} ({s['tokens']} tokens, {s['seconds']} s{end}):", "",
                      fence(text), text, fence(text), ""]
    write_text_atomic(out.markdown, "\n".join(lines))
