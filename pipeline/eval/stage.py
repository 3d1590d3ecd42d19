"""The evaluate stage: val loss, perplexity, bits per byte, accuracy, HellaSwag, lm-eval tasks and your own metrics of
the trained model."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.checkpoints.state import trained_params
from pipeline.config.all import Params
from pipeline.errors import UserError
from pipeline.eval.harness import lm_eval_scores
from pipeline.eval.hellaswag import describe_cut, hellaswag_scores, load_hellaswag
from pipeline.eval.hooks import custom_metrics
from pipeline.eval.lm import count_windows, covered_text_bytes, val_metrics
from pipeline.files import write_json_atomic
from pipeline.infra.distributed import Dist, leave_process_group
from pipeline.infra.hardware import use_tf32
from pipeline.layout import TokensDir
from pipeline.model.build import attention_kernel, count_params, inference_dtype, model_context
from pipeline.model.inference import load_for_inference
from pipeline.output import Echo, ProgressFactory, no_progress, silent
from pipeline.tokens import open_split, read_meta


def evaluate_model(p: Params, dist: Dist | None = None, progress: ProgressFactory = no_progress, echo: Echo = silent) -> dict:
    """The evaluate stage: metrics of the trained model, written to evaluate.metrics_file by rank 0.

    Launched on several processes (dist), each scores its share of the val windows and HellaSwag items, then leaves
    the process group; rank 0 goes on to lm-eval's tasks and evaluate.metrics, and writes the file.
    """
    cfg = p.evaluate
    rank, world_size = (dist.rank, dist.world_size) if dist else (0, 1)
    ref = p.model_for("evaluate")
    use_tf32(p.train.tf32)
    # Scored as the model was trained: trained with train.document_mask, attention inside each document (on a GPU
    # in bf16/fp16 with flash-attn installed, through its variable-length kernel).
    document_mask = trained_params(ref.path).document_mask
    dtype = inference_dtype(p.train)
    attention = attention_kernel("auto", document_mask, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"))
    model, tokenizer = load_for_inference(ref.path, dist.device if dist else None, dtype, key=ref.key, attention=attention,
                                          trust_remote_code=p.model.trust_remote_code)
    notes = []

    tokens_dir = TokensDir(p.tokenize.out_dir)
    meta = read_meta(tokens_dir.root)
    val = open_split(tokens_dir, "val", meta)
    if (val.vocab_size, val.eot_id) != (tokenizer.vocab_size, tokenizer.eot_id):
        raise UserError(f"{val.path} was tokenized with vocab_size={val.vocab_size}, eot_id={val.eot_id} but the model in "
                        f"{ref.path} has a tokenizer with {tokenizer.vocab_size}, {tokenizer.eot_id}: evaluate the model "
                        "trained on these tokens, or rerun the tokenize stage")
    block_size = p.eval_block_size
    context = model_context(model)
    if context and block_size > context:
        notes.append(f"block_size {block_size} capped at the model's context of {context} tokens")
        block_size = context
    n_windows = count_windows(len(val), block_size)
    if n_windows == 0:
        raise UserError(f"{val.path} holds {len(val)} token(s): at least 2 are needed to score a prediction")
    if cfg.max_windows and cfg.max_windows < n_windows:
        n_windows = cfg.max_windows
        text_bytes = covered_text_bytes(tokenizer, val.tokens[: n_windows * block_size + 1])
        notes.append(f"val: the first {n_windows} windows of {block_size} tokens (evaluate.max_windows)")
    else:
        split = meta.get("splits", {}).get("val", {})
        if split.get("tokens") != len(val):
            raise UserError(f"{tokens_dir.meta} does not describe {val.path} ({split.get('tokens')} "
                            f"tokens vs {len(val)}): rerun the tokenize stage")
        text_bytes = split.get("text_bytes") or covered_text_bytes(tokenizer, val.tokens)
    with progress("val windows", len(range(rank, n_windows, world_size))) as advance:
        eot = tokenizer.eot_id if document_mask else None
        v = val_metrics(model, val.tokens, block_size, cfg.batch_size, text_bytes, n_windows, rank, world_size, advance, eot)
    metrics = {
        "val": {"loss": v["val_loss"], "perplexity": v["perplexity"], "bits_per_byte": v["bits_per_byte"],
                "token_accuracy": v["token_accuracy"], "tokens": v["tokens_scored"], "block_size": block_size,
                **({"document_mask": True} if document_mask else {})},
    }

    if cfg.hellaswag or cfg.hellaswag_url:
        items = load_hellaswag(p, cfg.hellaswag_limit, progress)
        endings = sum(len(i.endings) for i in items)
        cut = set()
        with progress("HellaSwag endings", len(range(rank, endings, world_size))) as advance:
            metrics["hellaswag"] = hellaswag_scores(model, tokenizer, items, cfg.batch_size, advance, dist if world_size > 1 else None,
                                                    cut=cut)
        if cut:
            metrics["hellaswag"]["endings_cut"] = len(cut)
            notes.append(describe_cut(cut, context or 1 << 30))
    else:
        notes.append("hellaswag: skipped (evaluate.hellaswag not set)")
    if dist is not None:
        # Done with the other processes: lm-eval and your own metrics run on rank 0 alone, however long they take.
        leave_process_group(dist)
    if rank != 0:
        return metrics

    if cfg.lm_eval.tasks:
        if world_size > 1:
            notes.append("lm_eval: run on rank 0 alone")
        metrics["lm_eval"] = lm_eval_scores(cfg.lm_eval, model, tokenizer, cfg.lm_eval.batch_size or cfg.batch_size, echo)
    if cfg.metrics:
        metrics.update(custom_metrics(cfg.metrics, model, tokenizer, np.asarray(val.tokens)))  # a memmap when one shard

    metrics["model"] = {"parameters": count_params(model), "dir": str(ref.path)}
    metrics["notes"] = notes
    write_json_atomic(cfg.metrics_file, metrics)
    return metrics
