"""LoRA adapters through PEFT: which layers of an architecture get them, wrapping a base model with its weights frozen,
the adapter saved as a PEFT folder, merged into a plain Hugging Face model, and the base's fingerprint a run keeps.

PEFT does the adapter layers (as TRL, axolotl and torchtune's PEFT path do); this module only chooses and checks.
Not yet wired into training (issue 31): the train loop, checkpoints and exports call these next.
"""

from __future__ import annotations

import hashlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from pipeline.errors import UserError
from pipeline.files import sha256

# The linear layers LoRA adapts by default, per transformers model_type: every projection of attention and the MLP,
# as litgpt's and axolotl's LoRA defaults for these families. GPT-2's c_proj names both attention's output and the
# MLP's down projection.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{kind: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for kind in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
}  # fmt: skip
KEY = "train.lora_targets"


@dataclass(frozen=True)
class LoraSpec:
    """What the adapters are: rank, scale, dropout and the layers they adapt (None: the architecture's default)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None


@contextmanager
def peft_quiet() -> Iterator[None]:
    """PEFT 0.21.2 asks transformers 5 for `is_gradient_checkpointing`, deprecated there: a FutureWarning on every
    wrap and load that is PEFT's to fix, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def lora_config(model: torch.nn.Module, spec: LoraSpec):
    """PEFT's LoraConfig for model: the targets given or the architecture's default, each checked to name a layer."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    kind = getattr(getattr(model, "config", None), "model_type", None)
    if spec.targets:
        targets = list(spec.targets)
    elif kind in DEFAULT_TARGETS:
        targets = DEFAULT_TARGETS[kind]
    else:
        raise UserError(f"{KEY}: no default layers for model type {kind!r}: name the linear layers to adapt (e.g. [q_proj, v_proj];"
                        f" the names after the last dot in model.named_modules())")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise UserError(f"{KEY}: {', '.join(missing)} {'names' if len(missing) == 1 else 'name'} no layer of this {kind} model"
                        f" (its layers include {', '.join(sorted(n for n in names if n and not n.isdigit())[:12])}, ...)")
    # Conv1D (GPT-2 and its kin) stores weights as (in, out): PEFT must transpose its delta for them.
    fan_in_fan_out = any(isinstance(m, Conv1D) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets)
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")


def add_lora(model: torch.nn.Module, spec: LoraSpec, base_name: str):
    """model wrapped by PEFT with LoRA on its target layers; every base weight frozen, only the adapters train.
    base_name is what the adapter folder names as its base (model.init)."""
    from peft import get_peft_model

    config = lora_config(model, spec)
    model.name_or_path = base_name  # PEFT names the base in adapter_config.json from this attribute, not the config
    with peft_quiet():
        wrapped = get_peft_model(model, config)
    leaked = [name for name, p in wrapped.named_parameters() if p.requires_grad and "lora_" not in name]
    if leaked:  # PEFT keeps modules_to_save trainable; gptpipe asks for none, so a base weight here is a bug
        raise RuntimeError(f"base weights left trainable under LoRA: {leaked[:3]}")
    return wrapped


def trainable_share(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters): for the log line and plan."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """The adapter's weights as PEFT saves them (its own key names, without the adapter name)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def save_adapter(model, folder: str | Path) -> None:
    """A PEFT adapter folder (adapter_config.json naming the base, adapter_model.safetensors) that
    PeftModel.from_pretrained(base, folder) loads."""
    # Embeddings never train here, so PEFT need not look up the base's config (a hub id would mean the network).
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)


def merged_model(base: torch.nn.Module, adapter_dir: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """The base with the adapter folded into its weights: merged in fp32 from the saved files (never inside a training
    engine, so no ZeRO partition is in the way), then cast to dtype. A plain transformers model: loads without PEFT."""
    from peft import PeftModel

    with peft_quiet():
        adapted = PeftModel.from_pretrained(base.float(), str(adapter_dir), is_trainable=False)
    return adapted.merge_and_unload().to(dtype)


def base_fingerprint(folder: str | Path) -> str:
    """sha256 over a base model folder's config and weight files (names and bytes): what a LoRA run's checkpoints were
    trained on top of, so a resume on a changed base is refused rather than continued."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin")))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise UserError(f"model.init: {folder} holds no weights (*.safetensors or *.bin) to put adapters on")
    listing = "".join(f"{path.name}\0{sha256(path)}\n" for path in files)
    return hashlib.sha256(listing.encode()).hexdigest()
