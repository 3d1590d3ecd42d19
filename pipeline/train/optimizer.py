"""Which parameters each optimizer updates, at which learning rate: AdamW on all of them, or Muon on the 2-D hidden
matrices with AdamW on the rest (embeddings, output head, norms, biases), as in Keller Jordan's Muon and the
modded-nanogpt records (docs/muon.md).

The groups are handed to DeepSpeed, which builds the optimizer (its `MuonWithAuxAdam` for muon) and shards it
under ZeRO; each group keeps its peak learning rate as a multiple of train.lr, so the schedule moves every group
along the same curve.
"""

from __future__ import annotations

import math

import torch

from pipeline.config.train import TrainConfig


def param_groups(model: torch.nn.Module, t: TrainConfig) -> list[dict]:
    """Optimizer groups for train.optimizer; with muon every trainable parameter is tagged `use_muon` (DeepSpeed splits
    each group into its Muon and AdamW halves by that tag). Groups without parameters are left out."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = hidden_matrices(model) if t.optimizer == "muon" else {}
    adam_decay = [p for name, p in trainable if name not in hidden and _ndim(p) >= 2]
    adam_rest = [p for name, p in trainable if name not in hidden and _ndim(p) < 2]
    groups = [{"params": adam_decay, "lr": t.lr, "weight_decay": t.weight_decay}, {"params": adam_rest, "lr": t.lr, "weight_decay": 0.0}]
    if t.optimizer == "muon":
        for _, p in trainable:
            p.use_muon = False
        by_scale: dict[float, list] = {}
        for name, scale in hidden.items():
            param = dict(trainable)[name]
            param.use_muon = True
            by_scale.setdefault(scale, []).append(param)
        groups += [{"params": params, "lr": t.muon_lr * scale, "momentum": t.muon_momentum, "weight_decay": t.muon_weight_decay}
                   for scale, params in sorted(by_scale.items())]
    return [g for g in groups if g["params"]]


def hidden_matrices(model: torch.nn.Module) -> dict[str, float]:
    """name -> learning-rate factor of each 2-D weight Muon updates: every matrix but the embeddings and the output head.

    The factor undoes an orientation mistake: DeepSpeed scales Muon's update by sqrt(rows / cols) when rows > cols,
    taking rows as the output features, as in nn.Linear (out, in). GPT-2's Conv1D stores (in, out), so without the
    factor its MLP up-projection would get 1 instead of 2, its down-projection 2 instead of 1, and c_attn 1 instead of
    sqrt(3). Multiplying the group's learning rate by the right scale over the one DeepSpeed applies gives every
    matrix the update size of the published recipe.
    """
    from transformers.pytorch_utils import Conv1D

    outside = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        outside.add(id(head.weight))
    found = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in outside or _ndim(p) != 2:
                continue
            rows, cols = _shape(p)
            out_in = (cols, rows) if isinstance(module, Conv1D) else (rows, cols)
            found[f"{module_name}.{name}" if module_name else name] = _scale(*out_in) / _scale(rows, cols)
    return found


def _scale(rows: int, cols: int) -> float:
    """DeepSpeed's (and Keller Jordan's) Muon update scale for a (rows, cols) gradient."""
    return math.sqrt(rows / cols) if rows > cols else 1.0


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape, also when ZeRO-3 has partitioned it into a flat placeholder."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _ndim(p: torch.Tensor) -> int:
    return len(_shape(p))


def describe_optimizer(t: TrainConfig) -> str:
    """The optimizer in one phrase, for the run's log."""
    adam = f"AdamW lr {t.lr:.2e}, weight decay {t.weight_decay}"
    if t.optimizer == "adamw":
        return adam
    return (f"Muon lr {t.muon_lr:.2e}, momentum {t.muon_momentum}, weight decay {t.muon_weight_decay} on the hidden matrices;"
            f" {adam} on the rest")
