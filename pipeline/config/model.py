"""model's params: a Hugging Face causal LM from scratch (GPT-2 presets) or a checkpoint to fine-tune."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.config.base import Section, check


# GPT-2 shapes by parameter count: a preset fills these model.* keys (model_validator below).
GPT2_PRESETS = {
    "gpt2-124m": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
    "gpt2-350m": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "block_size": 1024},
    "gpt2-774m": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "block_size": 1024},
    "gpt2-1558m": {"n_layer": 48, "n_head": 25, "n_embd": 1600, "block_size": 1024},
}


class ModelConfig(Section):
    """model: a Hugging Face causal LM built from scratch or loaded from a checkpoint."""

    init: str = Field(
        "scratch", min_length=1, description="scratch, or a checkpoint to fine-tune: a local folder or hub id (gpt2, google/gemma-3-270m), or a gptpipe step, run or export folder"
    )
    arch: Literal["gpt2", "llama"] = Field("gpt2", description="scratch only: GPT-2 (learned positions, GELU) or Llama (RoPE, SwiGLU, RMSNorm)")
    preset: Literal["gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m"] | None = Field(
        None, description="scratch only: a GPT-2 shape (sets n_layer, n_head, n_embd and block_size 1024)"
    )
    n_layer: int = Field(4, ge=1, le=1024, description="scratch only: transformer blocks")
    n_head: int = Field(4, ge=1, le=1024, description="scratch only: attention heads")
    n_kv_head: int | None = Field(None, ge=1, le=1024, description="llama only: key/value heads (grouped-query attention); null = n_head")
    n_embd: int = Field(128, ge=8, le=1 << 16, description="scratch only: embedding width")
    intermediate_size: int | None = Field(None, ge=1, le=1 << 20, description="scratch only: MLP width (GPT-2's n_inner); null = 4 * n_embd for gpt2, 2/3 of that rounded up to 64 for llama")
    block_size: int = Field(128, ge=8, le=1 << 20, description="context length in tokens (training windows; pretrained: at most the model's)")
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="dropout on embeddings, attention and residuals (a pretrained model's too); null = 0 from scratch, the checkpoint's own when fine-tuning"
    )
    rope_theta: float = Field(10000.0, gt=0, description="llama only: RoPE base")
    tie_embeddings: bool = Field(True, description="scratch only: share the input embedding and the output head")
    trust_remote_code: bool = Field(False, description="pretrained only: run modelling code shipped with the checkpoint")

    @property
    def is_scratch(self) -> bool:
        return self.init == "scratch"

    # Keys that shape a model only for some settings: llama's own, and every shape key for a scratch model.
    LLAMA_ONLY: ClassVar[tuple[str, ...]] = ("n_kv_head", "rope_theta")
    SCRATCH_ONLY: ClassVar[tuple[str, ...]] = ("arch", "n_layer", "n_head", "n_embd", "intermediate_size", "tie_embeddings", *LLAMA_ONLY)

    def unused_keys(self) -> dict[str, str]:
        """key -> why it does nothing here, for each key set away from its default that these settings ignore
        (`n_kv_head` with arch gpt2, `n_layer` with a pretrained init). At its default such a key is harmless (the
        shipped params.yaml lists the shape keys, and `-S model.init=gpt2` must still work); moved, it is an error."""
        moved = [k for k in self.SCRATCH_ONLY if getattr(self, k) != type(self).model_fields[k].default]
        if not self.is_scratch:
            return {k: "a pretrained model keeps its own shape" for k in moved}
        if self.arch == "gpt2":
            return {k: "it shapes llama models only" for k in moved if k in self.LLAMA_ONLY}
        return {}

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        """A preset fills n_layer, n_head, n_embd and block_size, so every reader sees the real shape."""
        if not isinstance(data, dict) or not isinstance(data.get("preset"), str) or data["preset"] not in GPT2_PRESETS:
            return data  # no preset, or an unknown one (the field's own check names it)
        name, shape = data["preset"], GPT2_PRESETS[data["preset"]]
        problems = []
        if data.get("init", "scratch") != "scratch":
            problems.append(("preset", f"{name} is a shape to train from scratch, but model.init={data['init']!r}: remove one of them"))
        if data.get("arch", "gpt2") != "gpt2":
            problems.append(("preset", "GPT-2 presets need model.arch=gpt2"))
        # A dumped config (a checkpoint's params) repeats the preset's own values: those agree.
        clash = sorted(k for k in shape if k in data and str(data[k]) != str(shape[k]))
        if clash:
            problems.append((clash[0], f"{data[clash[0]]} set together with model.preset={name} ({clash[0]}={shape[clash[0]]}): remove one of them"))
        check(problems)
        return {**data, **shape}

    @model_validator(mode="after")
    def _shape(self):
        problems = []
        if self.n_embd % self.n_head:
            problems.append(("n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}"))
        if self.n_kv_head and self.n_head % self.n_kv_head:
            problems.append(("n_kv_head", f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}"))
        # A key that changes nothing would still change the run's identity: the no-op edit would start a new run.
        setting = f"model.init={self.init!r}" if not self.is_scratch else f"model.arch={self.arch}"
        problems += [(k, f"{getattr(self, k)!r} does nothing with {setting} ({why}): remove it") for k, why in self.unused_keys().items()]
        check(problems)
        return self
