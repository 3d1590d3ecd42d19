"""HellaSwag, zero-shot as lm-evaluation-harness scores it: items, the log-likelihood of each ending, acc and acc_norm."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config.all import Params
from pipeline.downloads import download
from pipeline.errors import UserError
from pipeline.files import absent, parse_json
from pipeline.infra.distributed import Dist
from pipeline.model.build import model_context
from pipeline.output import ProgressFactory, no_progress
from pipeline.tokenize.tokenizers import Tokenizer


@dataclass
class Item:
    query: str
    endings: list[str]
    label: int


def preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleanup: WikiHow's [title] becomes a full stop, other [tags] go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def parse_hellaswag(source: str | Path | Iterable[str]) -> list[Item]:
    """Items from a JSONL file (a str or Path) or from its lines; original or preprocessed format, line by line."""
    if not isinstance(source, (str, Path)):
        return [_parse_item(line, f"<hellaswag lines>:{n}") for n, line in enumerate(source, 1) if line.strip()]
    path = Path(source)
    if not path.is_file():
        raise UserError(f"evaluate.hellaswag: {path} {absent(path)}")
    try:
        with open(path, encoding="utf-8") as f:
            return [_parse_item(line, f"{path}:{n}") for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} of a line)") from None


def _parse_item(line: str, where: str) -> Item:
    doc = parse_json(line, where)
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    endings = doc.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: 'endings' must be a list of at least two strings")
    label = doc.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # the original data stores it as a string
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise UserError(f"{where}: 'label' must be an index into endings (0..{len(endings) - 1}), got {doc.get('label')!r}")
    if "ctx_a" in doc:  # the original format: build the query exactly as lm-evaluation-harness does
        fields = ("activity_label", "ctx_a", "ctx_b")
        if not all(isinstance(doc.get(k), str) for k in fields):
            raise UserError(f"{where}: the original format needs string fields {', '.join(fields)}")
        query = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        return Item(query, [preprocess(e) for e in endings], label)
    if not isinstance(doc.get("ctx"), str):
        raise UserError(f"{where}: needs 'ctx' (preprocessed format) or activity_label, ctx_a, ctx_b (original format)")
    return Item(doc["ctx"], endings, label)


def load_hellaswag(p: Params, limit: int | None, progress: ProgressFactory = no_progress) -> list[Item]:
    """The items of evaluate.hellaswag (or evaluate.hellaswag_url, downloaded once), the first `limit` of them."""
    if not (p.evaluate.hellaswag or p.evaluate.hellaswag_url):
        raise UserError("train.hellaswag_interval needs the items: set evaluate.hellaswag (a JSONL file) or evaluate.hellaswag_url")
    path = p.evaluate.hellaswag or fetch_hellaswag(p.evaluate.hellaswag_url, p.prepare.download_dir, progress)
    return parse_hellaswag(path)[: limit or p.evaluate.hellaswag_limit]


def fetch_hellaswag(url: str, cache_dir: str | Path, progress: ProgressFactory = no_progress) -> Path:
    """The HellaSwag JSONL at url, downloaded once into cache_dir."""
    try:
        return download(url, cache_dir, progress)
    except UserError as e:
        reason = str(e).partition(". Offline?")[0]
        raise UserError(f"evaluate.hellaswag_url: {reason}. Offline? Download the file once and set evaluate.hellaswag "
                        "to its path (and evaluate.hellaswag_url to null)") from None


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness makes them.

    Trailing spaces of the context move to the continuation; the continuation's ids are those of
    context + continuation after the context's own, so a merge across the boundary is kept as it would occur.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation)
    whole = tokenizer.encode_prompt(context + continuation)  # a BOS first where documents start with one
    context_ids = tokenizer.encode_prompt(context)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def choice_logliks(model, tokenizer: Tokenizer, items: list[Item], batch_size: int, progress: Callable[[int], None] | None = None,
                   dist: Dist | None = None, max_len: int | None = None, cut: set[int] | None = None) -> list[list[float]]:
    """Summed log-likelihood of each item's endings (as the continuation " " + ending of its query).

    With dist, rank r scores requests r, r + world_size, ... and every rank gets them all back; every rank runs
    the same number of forward passes (ZeRO-3 gathers parameters inside each), a short one scoring a placeholder.
    model may be a DeepSpeed engine (training) or a plain module; max_len defaults to the model's context.
    An ending longer than the context is scored on its last max_len tokens (lm-eval refuses it instead): the
    indices of such items are added to cut, so the caller can say so.
    """
    max_len = max_len or model_context(model) or 1 << 30
    requests = []  # (item, ending, input ids, continuation ids)
    for i, item in enumerate(items):
        for j, ending in enumerate(item.endings):
            context_ids, cont_ids = encode_pair(tokenizer, item.query, " " + ending)
            ids = (context_ids + cont_ids)[-(max_len + 1) :][:-1]  # truncated from the left, like lm-eval
            if len(cont_ids) > len(ids) and cut is not None:
                cut.add(i)
            requests.append((i, j, ids, cont_ids[-len(ids) :]))
    requests.sort(key=lambda r: -len(r[2]))  # similar lengths together: less padding
    rank, world_size = (dist.rank, dist.world_size) if dist else (0, 1)
    mine = requests[rank::world_size]
    n_batches = math.ceil(math.ceil(len(requests) / world_size) / batch_size)
    device = next(model.parameters()).device
    found = torch.zeros(len(requests), dtype=torch.float64, device=device)  # by position in requests
    for b in range(n_batches):
        batch = mine[b * batch_size : (b + 1) * batch_size] or requests[:1]
        x = torch.zeros(len(batch), len(batch[0][2]), dtype=torch.long)
        for row, (_, _, ids, _) in enumerate(batch):
            x[row, : len(ids)] = torch.tensor(ids)
        # Only the positions that predict a continuation need the output layer and a softmax over the vocabulary:
        # the last `keep` positions of the padded batch hold every row's continuation.
        first = min(len(ids) - len(cont) for _, _, ids, cont in batch)
        logits = continuation_logits(model, x.to(device), keep=x.shape[1] - first)  # (B, keep, V)
        if not mine[b * batch_size : (b + 1) * batch_size]:
            continue  # the placeholder: this rank had nothing left
        for row, (_, _, ids, cont) in enumerate(batch):
            # The logits at position t predict token t + 1, so the last len(cont) positions predict the continuation.
            at = torch.arange(len(ids) - len(cont), len(ids), device=device) - first
            logprobs = F.log_softmax(logits[row, at].float(), dim=-1)  # (len(cont), V)
            found[(b * batch_size + row) * world_size + rank] = logprobs[torch.arange(len(cont), device=device), torch.tensor(cont, device=device)].sum()
        if progress:
            progress(len(batch))
    if world_size > 1:
        torch.distributed.all_reduce(found)
    out = [[0.0] * len(item.endings) for item in items]
    for (i, j, _, _), value in zip(requests, found.tolist()):
        out[i][j] = value
    return out


def continuation_logits(model, x: torch.Tensor, keep: int) -> torch.Tensor:
    """The logits of the last `keep` positions of x (B, T): transformers' logits_to_keep, so the output layer runs on
    those positions only; models whose forward lacks it (remote code) compute them all and are sliced."""
    try:
        return model(input_ids=x, use_cache=False, logits_to_keep=keep).logits
    except TypeError:
        return model(input_ids=x, use_cache=False).logits[:, -keep:]


def accuracy_counts(items: list[Item], logliks: list[list[float]]) -> dict:
    """acc: the highest summed log-likelihood is the label; acc_norm: the highest per character of the ending.

    Like lm-evaluation-harness, the length is that of the ending itself, without the space before it.
    """
    correct = correct_norm = 0
    for item, lls in zip(items, logliks):
        lls = np.array(lls)
        lengths = np.array([max(len(e), 1) for e in item.endings], dtype=np.float64)
        correct += int(np.argmax(lls) == item.label)
        correct_norm += int(np.argmax(lls / lengths) == item.label)
    return {"correct": correct, "correct_norm": correct_norm, "n": len(items)}


def hellaswag_scores(model, tokenizer: Tokenizer, items: list[Item], batch_size: int, progress: Callable[[int], None] | None = None,
                     dist: Dist | None = None, max_len: int | None = None, cut: set[int] | None = None) -> dict:
    """{"acc", "acc_norm", "n"} of the model on items, zero-shot as lm-evaluation-harness scores HellaSwag: the one
    scoring chain, for the evaluate stage and training's evaluations (dist, max_len and cut as choice_logliks takes them)."""
    counts = accuracy_counts(items, choice_logliks(model, tokenizer, items, batch_size, progress, dist, max_len, cut))
    return scores_from_counts(counts)


def describe_cut(cut: set[int], max_len: int) -> str:
    """A note for items whose ending did not fit in the context (1-based, as in the file's item order)."""
    shown = ", ".join(str(i + 1) for i in sorted(cut)[:5]) + (", ..." if len(cut) > 5 else "")
    return (f"hellaswag: {len(cut)} item(s) have an ending longer than the model's context of {max_len} tokens (items {shown});"
            " only each such ending's last tokens were scored")


def scores_from_counts(counts: dict) -> dict:
    n = max(counts["n"], 1)
    return {"acc": counts["correct"] / n, "acc_norm": counts["correct_norm"] / n, "n": counts["n"]}
