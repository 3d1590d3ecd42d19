"""Schemas for params.yaml: one pydantic model per section, the single source of truth for every knob.

Values derived from them (a preset's shape, the batch arithmetic, the model a stage reads) are computed here, once.
Reading the file and formatting errors live in params.py.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import UserError
from pipeline.layout import ReportDir, SamplesDir, saved_tokenizer

# Upper bounds: a size or seed beyond what the code can hold is a clear error here, not an overflow or a hang later.
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds, with room for seed + rank
BIG = 10**12  # counts of steps, characters, items


class Section(BaseModel):
    """Base for every params section: unknown keys are errors at every depth, values are coerced."""

    # Lax mode coerces the strings `dvc exp run -S` writes ("3e-05", "4096", "true") to the field's type, and the
    # numbers it writes for names (`-S train.run_name=123` gives 123) to text; inf and nan are never a sensible setting.
    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True, allow_inf_nan=False,
                              coerce_numbers_to_str=True)


class Problems(ValueError):
    """Cross-field problems found by a model validator: (key relative to the model, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))
        self.problems = problems


def check(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise Problems(problems)


# --------------------------------------------------------------------------------------------- prepare


class SourceConfig(Section):
    """Where raw text comes from."""

    kind: Literal["builtin", "files", "url", "hf"] = Field(
        "builtin", description="builtin (offline corpus every Python carries), files, url or hf (a Hugging Face dataset)"
    )
    name: Literal["pydoc_topics", "stdlib"] = Field(
        "pydoc_topics", description="builtin only: pydoc_topics (Python's help topics, ~0.5 MB) or stdlib (its .py sources, ~5 MB)"
    )
    path: str | None = Field(None, description="files only: a file, a folder or a glob such as data/raw/*.jsonl")
    url: str | None = Field(None, description="url only: an http(s) address, downloaded once into prepare.download_dir")
    dataset: str | None = Field(None, description="hf only: dataset name on the hub or a local dataset script/folder")
    config: str | None = Field(None, description="hf only: dataset configuration name")
    data_files: str | None = Field(
        None, description="hf only: files for a packaged builder, e.g. dataset: json with data_files: data/raw/*.jsonl (works offline)"
    )
    split: str = Field("train", min_length=1, description="hf only: the split to read")
    format: Literal["auto", "text", "jsonl", "json", "csv", "parquet"] = Field(
        "auto", description="file format; auto picks it from the extension (.txt/.md = text)"
    )
    text_column: str = Field("text", min_length=1, description="JSONL/JSON/CSV/Parquet/hf: the column holding the text")
    separator: str | None = Field(
        None, description='text only: split each file into documents at this string (e.g. "\\n\\n"); none = one document per file'
    )

    @model_validator(mode="after")
    def _kind_needs(self):
        need = {"files": "path", "url": "url", "hf": "dataset"}.get(self.kind)
        problems = []
        if need and not getattr(self, need):
            problems.append((need, f"required when kind is '{self.kind}'"))
        if self.kind == "url" and self.url and not self.url.startswith(("http://", "https://")):
            problems.append(("url", f"got {self.url!r}; expected an http:// or https:// address"))
        if self.separator == "":
            problems.append(("separator", "must not be empty (use null for one document per file)"))
        check(problems)
        return self


class PrepareConfig(Section):
    """prepare: raw text -> normalised documents split into train and val."""

    source: SourceConfig = Field(default_factory=SourceConfig, description="the corpus")
    val_source: SourceConfig | None = Field(None, description="a separate validation corpus; null = split val_fraction off source")
    val_fraction: float = Field(0.1, ge=0.0, le=0.5, description="fraction held out for validation: of the documents (split: hash) or of the text (split: tail)")
    split: Literal["hash", "tail"] = Field(
        "hash", description="hash: each document goes to val by a seeded hash of its text; tail: the last val_fraction of the text, cut at that character (nanoGPT's split)"
    )
    seed: int = Field(1337, ge=0, le=MAX_SEED, description="seed of the train/val split")
    dedup: bool = Field(True, description="drop exact duplicate documents (after normalisation)")
    nfc: bool = Field(True, description="normalise Unicode to NFC")
    min_chars: int = Field(1, ge=1, le=BIG, description="drop documents shorter than this many characters after normalisation")
    unicode_errors: Literal["strict", "replace"] = Field(
        "strict", description="invalid UTF-8: strict fails naming the file and byte offset; replace substitutes U+FFFD and counts"
    )
    store: Literal["text", "index"] = Field(
        "text", description="text: write the documents to train.jsonl and val.jsonl (readable; a second copy of the corpus); index: write only "
        "plan.bin, each document's fate, and tokenize reads the source again (no copy: for corpora of gigabytes)"
    )
    download_dir: str = Field(
        "data/cache/downloads", min_length=1, description="where url sources (and evaluate.hellaswag_url) are downloaded once"
    )
    out_dir: str = Field("data/prepared", min_length=1, description="where train.jsonl and val.jsonl (or plan.bin) and manifest.json go")

    @model_validator(mode="after")
    def _split(self):
        if self.val_source is None and self.val_fraction == 0:
            check([("val_fraction", "is 0 and val_source is null: set one of them so there is a validation split")])
        return self


# -------------------------------------------------------------------------------------------- tokenize


class TokenizeConfig(Section):
    """tokenize: documents -> a tokenizer and memory-mappable token files."""

    kind: Literal["tiktoken", "char", "bpe", "hf", "import"] = Field(
        "bpe", description="tiktoken (OpenAI BPE), char (characters of the train split), bpe (byte-level BPE trained here), hf, or import (ids made elsewhere: import_dirs)"
    )
    import_dirs: list[str] = Field(
        default_factory=list, description="import only: nanoGPT data folders (train.bin, val.bin; meta.pkl for char data, else gpt2 ids) or gptpipe token folders, concatenated split by split (one tokenizer); keep them under data/raw"
    )
    import_encoding: Literal["auto", "gpt2"] = Field(
        "auto", description="import only: the ids of a nanoGPT folder without meta.pkl; auto = tiktoken's gpt2, refused when every id is below 256 (char data that lost its meta.pkl); gpt2 = gpt2 ids even then"
    )
    encoding: str = Field("gpt2", min_length=1, description="tiktoken only: encoding name (gpt2, r50k_base, cl100k_base, ...)")
    vocab_size: int = Field(4096, ge=260, le=1_000_000, description="bpe only: vocabulary size to train, special tokens included")
    min_frequency: int = Field(2, ge=1, le=BIG, description="bpe only: minimum pair count for a merge")
    pretrained: str | None = Field(
        None, description="hf: tokenizer folder or hub id (use the model's own for fine-tuning); other kinds: a gptpipe checkpoint, run folder or export whose tokenizer to reuse instead of training one (continued training)"
    )
    add_bos: bool | Literal["auto"] = Field(
        "auto", description="start every document with the tokenizer's BOS token; auto = when the tokenizer adds one itself (Llama, Gemma)"
    )
    parse_special: bool = Field(
        True, description="hf only: special tokens written in the text (<sep>, <|endoftext|>) become their ids, as AutoTokenizer does; false for untrusted text"
    )
    unknown_chars: Literal["error", "skip", "unk"] = Field(
        "unk", description="char only, for characters not in the train split: error, skip them, or map to an <unk> token"
    )
    workers: int = Field(
        0, ge=0, le=1024, description="threads encoding tiktoken/char chunks; 0 = one per usable core (bpe/hf use tokenizers' own pool)"
    )
    chunk_bytes: int = Field(1 << 20, ge=1024, le=1 << 31, description="text per unit of parallel work; bounds memory whatever the corpus size")
    shard_tokens: int = Field(
        100_000_000, ge=1024, le=1 << 40, description="ids per token file (train-00000.bin, ...): DVC hashes each, and an interrupted tokenize keeps the finished ones"
    )
    out_dir: str = Field("data/tokens", min_length=1, description="where the token shards, meta.json and tokenizer/ go")
    metrics_file: str = Field(
        "reports/tokenize.json", min_length=1, description="throughput of the run (kept out of out_dir, so that stays a pure function of its inputs)"
    )

    @model_validator(mode="after")
    def _kind_needs(self):
        if self.kind == "hf" and not self.pretrained:
            check([("pretrained", "required when kind is 'hf' (a tokenizer folder or hub id)")])
        if self.kind == "import" and not self.import_dirs:
            check([("import_dirs", "required when kind is 'import': the nanoGPT data or token folders to import")])
        if self.import_dirs and self.kind != "import":
            check([("import_dirs", f"set with tokenize.kind={self.kind}: it is read with kind import only")])
        if self.import_encoding != "auto" and self.kind != "import":
            check([("import_encoding", f"set with tokenize.kind={self.kind}: it is read with kind import only")])
        return self


# ----------------------------------------------------------------------------------------------- model

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


# ----------------------------------------------------------------------------------------------- train


@dataclass(frozen=True)
class Batch:
    """The batch arithmetic of a run: derived once from train.*, model.block_size and the world size."""

    micro_batch_size: int  # sequences per process per forward/backward
    grad_accum: int  # micro steps per optimizer step
    world_size: int
    block_size: int

    @property
    def global_size(self) -> int:
        """Sequences per optimizer step over all processes."""
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_size * self.block_size


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# Marks a train.* key that says how long to train, how often to look or where things go, not what is learned:
# changing it keeps the run (its checkpoints resume). Every other train.* key is part of the run's identity.
KEEPS_RUN = {"keeps_run": True}


class TrainPart(Section):
    """Base of the train.* groups below: each adds its cross-field problems, so one message names them all."""

    def problems(self) -> list[tuple[str, str]]:
        return []


class LengthConfig(TrainPart):
    """How long to train: exactly one of max_steps and epochs."""

    max_steps: int | None = Field(300, ge=1, le=BIG, description="optimizer steps in total (a resumed run continues up to this); null when epochs is set", json_schema_extra=KEEPS_RUN)
    epochs: float | None = Field(
        None, gt=0, le=1e6, description="passes over the train split instead of max_steps (set max_steps: null): steps = epochs x windows / global batch", json_schema_extra=KEEPS_RUN)

    def total_steps(self, train_windows: int, batch: Batch) -> int:
        """max_steps, or the steps epochs passes over train_windows take at this global batch."""
        if self.max_steps is not None:
            return self.max_steps
        steps = max(1, math.ceil(self.epochs * train_windows / batch.global_size))
        if self.warmup_steps > steps:
            raise UserError(f"train.warmup_steps={self.warmup_steps} is more than the {steps} steps train.epochs={self.epochs:g} gives"
                            f" ({train_windows:,} windows, {batch.global_size} per step): lower warmup_steps or raise epochs")
        return steps

    def problems(self) -> list[tuple[str, str]]:
        problems = []
        if (self.max_steps is None) == (self.epochs is None):
            fix = "set max_steps: null to train by epochs" if self.epochs is not None else "set one of them"
            problems.append(("max_steps", f"train.max_steps and train.epochs: exactly one must be set ({fix})"))
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            problems.append(("warmup_steps", f"{self.warmup_steps} is more than train.max_steps={self.max_steps}"))
        return [*super().problems(), *problems]


class BatchConfig(TrainPart):
    """The batch, in sequences of model.block_size tokens."""

    micro_batch_size: int = Field(16, ge=1, le=1 << 16, description="sequences per process per forward/backward")
    grad_accum: int | None = Field(None, ge=1, le=1 << 16, description="micro steps per optimizer step; null = from global_batch_tokens (or 1)")
    global_batch_tokens: int | None = Field(
        None, ge=1, le=1 << 40, description="tokens per optimizer step over all processes; grad_accum is derived from it"
    )
    document_mask: bool = Field(
        False, description="attention stays inside each document of a window: positions restart after each end-of-text, so the mask is block-diagonal causal (evaluation scores the same way); for many short documents")

    def batch(self, world_size: int, block_size: int) -> Batch:
        """The batch arithmetic for this world size; UserError when the batch keys disagree."""
        per_micro = self.micro_batch_size * world_size * block_size
        accum = self.grad_accum or 1
        if self.global_batch_tokens is not None:
            accum, rest = divmod(self.global_batch_tokens, per_micro)
            if rest or accum == 0 or (self.grad_accum and self.grad_accum != accum):
                sequences, per_process = divmod(self.global_batch_tokens, block_size)
                fits = [n for n in range(1, min(sequences, 4096) + 1) if not per_process and sequences % (n * self.micro_batch_size) == 0]
                fix = f"it splits over {', '.join(map(str, fits[:-1]))}{' or ' if len(fits) > 1 else ''}{fits[-1]} processes" if fits else (
                      "no number of processes splits it")
                raise UserError(
                    f"train.global_batch_tokens={self.global_batch_tokens} must equal train.micro_batch_size ({self.micro_batch_size})"
                    f" x train.grad_accum x {world_size} processes x model.block_size ({block_size}) = a multiple of {per_micro}"
                    + (f" with grad_accum={self.grad_accum}" if self.grad_accum else "")
                    + f": {fix} at this micro batch; change the micro batch or the number of processes, or set only one of"
                    " global_batch_tokens and grad_accum"
                )
        return Batch(self.micro_batch_size, accum, world_size, block_size)


class OptimizerConfig(TrainPart):
    """The optimizer (AdamW, or Muon with AdamW beside it) and the learning-rate schedule."""

    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw on every parameter, or muon on the 2-D hidden matrices with AdamW (train.lr, beta1, beta2,"
        " weight_decay) on the embeddings, output head, norms and biases (docs/muon.md)")
    muon_lr: float = Field(0.02, gt=0, description="muon only: peak learning rate of the hidden matrices (the schedule scales it like train.lr)")
    muon_momentum: float = Field(0.95, gt=0, lt=1, description="muon only: Nesterov momentum of the hidden matrices")
    muon_weight_decay: float = Field(0.01, ge=0, description="muon only: decoupled weight decay of the hidden matrices")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (with muon: of the AdamW half)")
    min_lr: float | None = Field(None, ge=0, description="learning rate at the end of the decay; null = lr / 10")
    warmup_steps: int = Field(30, ge=0, le=BIG, description="steps of linear warmup from 0 to lr")
    schedule: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine", description="after warmup: cosine or linear decay to min_lr, constant lr, or wsd (warmup-stable-decay: lr, then a linear decay over the last decay_fraction)"
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd only: the fraction of the steps after warmup spent decaying to min_lr")
    decay_steps: int | None = Field(
        None, ge=1, le=BIG, description="the step the decay ends at (then min_lr holds; nanoGPT's lr_decay_iters); null = the run's first length, kept when max_steps is raised later", json_schema_extra=KEEPS_RUN)
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay, on matrices only (not biases, norms)")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this; 0 = off (always off with muon)")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def clip(self) -> float:
        """The global gradient norm clipped to: never with muon (see problems)."""
        return 0.0 if self.optimizer == "muon" else self.grad_clip

    def problems(self) -> list[tuple[str, str]]:
        problems = []
        if self.min_lr is not None and self.min_lr > self.lr:
            problems.append(("min_lr", f"{self.min_lr} is above train.lr={self.lr}"))
        if self.optimizer == "muon" and self.grad_clip > 0 and "grad_clip" in self.model_fields_set:
            # DeepSpeed 0.19.8 clips Muon's orthogonalised update under ZeRO 1-3 (docs/muon.md): off, so every stage agrees.
            problems.append(("grad_clip", f"{self.grad_clip} does not apply with train.optimizer=muon (Muon's update has a"
                                          " fixed size; gptpipe does not clip it): set train.grad_clip=0"))
        if self.decay_steps is not None and self.decay_steps < self.warmup_steps:
            problems.append(("decay_steps", f"{self.decay_steps} is before the end of warmup (train.warmup_steps={self.warmup_steps})"))
        return [*super().problems(), *problems]


class PrecisionConfig(TrainPart):
    """Precision, memory and speed: DeepSpeed's ZeRO and offload, activation checkpointing, compile, the seed."""

    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="training precision (bf16 keeps fp32 master weights)")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 off, 1 optimizer, 2 + gradients, 3 + parameters")
    offload_optimizer: bool = Field(False, description="ZeRO 1-3: keep optimizer state in CPU memory (compiles DeepSpeed's CPU Adam)")
    offload_params: bool = Field(False, description="ZeRO 3: keep parameters in CPU memory")
    activation_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    compile: bool = Field(
        False, description="torch.compile the model (through DeepSpeed): faster on GPUs; on a CPU small models gain little for their compile time", json_schema_extra=KEEPS_RUN)
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="the attention kernel (transformers' attn_implementation): auto = SDPA, or for train.document_mask on a CUDA GPU in bf16/fp16 "
        "with flash-attn installed its variable-length kernel; eager = plain matmuls (slow: for debugging)", json_schema_extra=KEEPS_RUN)
    tf32: bool = Field(
        True, description="GPUs, fp32: matmuls and convolutions in TF32 on tensor cores (Ampere and newer), as nanoGPT sets; MFU is then against the TF32 peak", json_schema_extra=KEEPS_RUN)
    seed: int = Field(1337, ge=0, le=MAX_SEED, description="seed of initialisation, data order and dropout")

    def problems(self) -> list[tuple[str, str]]:
        problems = []
        if self.offload_params and self.zero_stage != 3:
            problems.append(("offload_params", "needs train.zero_stage=3"))
        if self.offload_optimizer and self.zero_stage == 0:
            problems.append(("offload_optimizer", "needs train.zero_stage 1, 2 or 3"))
        if self.precision == "fp16" and self.zero_stage == 0 and self.offload_optimizer:
            problems.append(("precision", "fp16 with offload needs ZeRO"))
        return [*super().problems(), *problems]


class CadenceConfig(TrainPart):
    """What happens along the way, and how often: logs, evaluations, HellaSwag, samples, checkpoints, early stopping."""

    log_interval: int = Field(10, ge=1, le=BIG, description="log train metrics every N steps", json_schema_extra=KEEPS_RUN)
    eval_interval: int = Field(50, ge=1, le=BIG, description="evaluate val loss every N steps (and at the end)", json_schema_extra=KEEPS_RUN)
    eval_batches: int = Field(
        4, ge=1, le=1 << 20, description="val windows per evaluation = eval_batches x micro_batch_size, a fixed set shared by all processes", json_schema_extra=KEEPS_RUN)
    eval_batch_size: int | None = Field(
        None, ge=1, le=1 << 16, description="sequences per forward pass of training's evaluations (val loss, HellaSwag); null = micro_batch_size. The windows scored stay the same, so only speed and memory change", json_schema_extra=KEEPS_RUN)
    eval_at_start: bool = Field(False, description="evaluate before the first step (a pretrained model's val loss before fine-tuning)", json_schema_extra=KEEPS_RUN)
    early_stopping_patience: int | None = Field(
        None, ge=1, le=1 << 20, description="stop after this many evaluations without a val loss improvement of at least early_stopping_min_delta; null = off", json_schema_extra=KEEPS_RUN)
    early_stopping_min_delta: float = Field(0.0, ge=0, description="the smallest val loss decrease that counts as an improvement for early stopping", json_schema_extra=KEEPS_RUN)
    hellaswag_interval: int | None = Field(
        None, ge=1, le=BIG, description="score HellaSwag (evaluate.hellaswag) every N steps, logged as hellaswag/acc_norm; null = off", json_schema_extra=KEEPS_RUN)
    hellaswag_limit: int | None = Field(200, ge=1, le=BIG, description="HellaSwag items scored during training; null = evaluate.hellaswag_limit", json_schema_extra=KEEPS_RUN)
    sample_interval: int | None = Field(None, ge=1, le=BIG, description="generate from sample_prompts every N steps into the training log and report; null = off", json_schema_extra=KEEPS_RUN)
    sample_prompts: list[str] = Field(default_factory=lambda: ["\n"], description="prompts sampled during training (one sample each, top-k 50, a fixed seed)", json_schema_extra=KEEPS_RUN)
    sample_max_new_tokens: int = Field(64, ge=1, le=1 << 16, description="tokens generated per prompt during training", json_schema_extra=KEEPS_RUN)
    target_loss: float | None = Field(
        None, gt=0, le=1e4, description="a val loss to reach: the first in-loop evaluation at or below it records the steps, tokens, model FLOPs and seconds it took (metrics.json: target); null = off", json_schema_extra=KEEPS_RUN)
    stop_at_target: bool = Field(False, description="end the run (then export) at the first evaluation that reaches target_loss", json_schema_extra=KEEPS_RUN)
    save_interval: int = Field(
        100, ge=0, le=BIG, description="checkpoint every N steps (and at the end); 0 = only at the end (and, with export: best, at each improvement)", json_schema_extra=KEEPS_RUN)
    keep_last: int = Field(2, ge=1, le=1 << 20, description="checkpoints kept, plus the best by val loss", json_schema_extra=KEEPS_RUN)

    @property
    def eval_windows(self) -> int:
        """Val windows scored at each in-training evaluation, whatever the number of processes."""
        return self.eval_batches * self.micro_batch_size

    def problems(self) -> list[tuple[str, str]]:
        problems = []
        if self.stop_at_target and self.target_loss is None:
            problems.append(("stop_at_target", "needs train.target_loss (the val loss to stop at)"))
        return [*super().problems(), *problems]


class RunConfig(TrainPart):
    """The run and its results: its name, whether to resume, what to export, where metrics are logged."""

    run_name: str | None = Field(
        None, description="the checkpoint folder's name under out_dir (and the name loggers show); null = run-<hash of what must match to resume>", json_schema_extra=KEEPS_RUN)
    resume: str = Field(
        "auto", min_length=1, description="auto (the newest intact checkpoint of this run), never (start over; the old folder is kept as <folder>.previous, or .previous.2, ... : none is deleted) or a checkpoint folder", json_schema_extra=KEEPS_RUN)
    export: Literal["best", "last"] = Field("best", description="export the checkpoint with the lowest val loss (best) or the last weights", json_schema_extra=KEEPS_RUN)
    export_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="dtype of the exported weights: auto = fp32 for a model trained from scratch, the checkpoint's own for a fine-tune", json_schema_extra=KEEPS_RUN)
    loggers: list[Literal["dvclive", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["dvclive"], description="where metrics go; dvclive (DVCLive's files, which DVC plots and dvc exp show read) is always on, tensorboard and wandb are extras", json_schema_extra=KEEPS_RUN)
    wandb_project: str = Field("gptpipe", min_length=1, description="wandb: the project (set WANDB_MODE=offline to log without network)", json_schema_extra=KEEPS_RUN)
    peak_tflops: float | None = Field(None, gt=0, description="device peak TFLOP/s per process for MFU; null = a known GPU's dense peak, else measured here once (a short matmul calibration, cached in ~/.cache/gptpipe/peaks.json)", json_schema_extra=KEEPS_RUN)

    def problems(self) -> list[tuple[str, str]]:
        problems = []
        if self.run_name is not None and not RUN_NAME.match(self.run_name):
            problems.append(("run_name", f"{self.run_name!r}: letters, digits, '.', '_' and '-' only (it names a folder)"))
        return [*super().problems(), *problems]


# The deepspeed launcher's --include/--exclude: hosts joined by @, each with an optional list of device slots.
NODE_SPECS = re.compile(r"[A-Za-z0-9_.-]+(:\d+(,\d+)*)?(@[A-Za-z0-9_.-]+(:\d+(,\d+)*)?)*")


class LaunchConfig(TrainPart):
    """Launching: the deepspeed launcher, hostfile and devices, a DeepSpeed JSON on top, the collective timeout."""

    launcher: Literal["python", "deepspeed"] = Field(
        "python", description="python: one process; deepspeed: re-launch through the deepspeed launcher (GPUs, hostfile)", json_schema_extra=KEEPS_RUN)
    hostfile: str | None = Field(None, description="deepspeed launcher: hostfile for multi-node runs (see hostfile.example)", json_schema_extra=KEEPS_RUN)
    num_gpus: int | None = Field(None, ge=1, le=1 << 12, description="deepspeed launcher: processes per node; null = all devices", json_schema_extra=KEEPS_RUN)
    num_nodes: int | None = Field(None, ge=1, le=1 << 16, description="deepspeed launcher: nodes to use from the hostfile; null = all", json_schema_extra=KEEPS_RUN)
    include: str | None = Field(None, description="deepspeed launcher --include: hosts and devices to use, e.g. localhost:2,3 or worker-1@worker-2:0,1", json_schema_extra=KEEPS_RUN)
    exclude: str | None = Field(None, description="deepspeed launcher --exclude: hosts and devices to leave out, e.g. worker-2:0", json_schema_extra=KEEPS_RUN)
    master_port: int = Field(29500, ge=1024, le=65535, description="deepspeed launcher: rendezvous port on the first node", json_schema_extra=KEEPS_RUN)
    launcher_args: list[str] = Field(default_factory=list, description="extra deepspeed launcher arguments, e.g. [--no_ssh_check, --master_addr, 10.0.0.1]", json_schema_extra=KEEPS_RUN)
    deepspeed_config: str | None = Field(None, description="a DeepSpeed JSON for what the params do not set (communication, buckets, ...); keys the params own only as \"auto\" or the same value")
    collective_timeout: int = Field(
        600, ge=10, le=86400, description="seconds a process waits for the others in a collective before the run ends with a message (a frozen rank)", json_schema_extra=KEEPS_RUN)

    def problems(self) -> list[tuple[str, str]]:
        problems = []
        if (self.include or self.exclude) and (self.num_gpus or self.num_nodes):
            problems.append(("include" if self.include else "exclude", "cannot be combined with train.num_gpus or train.num_nodes (the launcher refuses it): keep one way"))
        for key in ("include", "exclude"):
            spec = getattr(self, key)
            if spec is not None and not NODE_SPECS.fullmatch(spec):
                problems.append((key, f"{spec!r} is not the launcher's HOST[:SLOT,...][@HOST[:SLOT,...]...], e.g. localhost:2,3 or worker-1@worker-2:0,1"))
        return [*super().problems(), *problems]


class OutputsConfig(TrainPart):
    """Where training writes."""

    out_dir: str = Field("checkpoints", min_length=1, description="checkpoints, one folder per run (a DVC out with persist: true)", json_schema_extra=KEEPS_RUN)
    export_dir: str = Field("models/final", min_length=1, description="the trained model as a Hugging Face folder", json_schema_extra=KEEPS_RUN)
    metrics_dir: str = Field("reports/train", min_length=1, description="DVCLive metrics and plots of training", json_schema_extra=KEEPS_RUN)


class TrainConfig(OutputsConfig, LaunchConfig, RunConfig, CadenceConfig, PrecisionConfig, OptimizerConfig, BatchConfig, LengthConfig):
    """train: the DeepSpeed run. Batch sizes are in sequences of model.block_size tokens.

    The keys stay flat (train.lr, train.zero_stage); each group of them, with its own checks, is a class above
    (listed last to first, so the keys keep the order of the groups).
    """

    @classmethod
    def identity_keys(cls) -> list[str]:
        """The train.* keys a run's identity holds: every one not marked KEEPS_RUN."""
        return [name for name, field in cls.model_fields.items() if not (field.json_schema_extra or {}).get("keeps_run")]

    @model_validator(mode="after")
    def _checks(self):
        check(self.problems())
        return self


# -------------------------------------------------------------------------------------------- evaluate


class LmEvalTask(Section):
    """One lm-evaluation-harness task."""

    name: str = Field(..., min_length=1, description="an lm-eval task or group (arc_easy, hellaswag, ...) or one defined in include_path")
    num_fewshot: int | None = Field(None, ge=0, le=1 << 10, description="examples in the prompt; null = the task's own default")
    limit: int | None = Field(None, ge=1, le=BIG, description="score only the first N documents; null = all")


class LmEvalConfig(Section):
    """evaluate.lm_eval: any lm-evaluation-harness task, run on the model evaluate reads (pip install 'gptpipe[lm-eval]')."""

    tasks: list[LmEvalTask] = Field(default_factory=list, description="tasks to run (a name, or {name, num_fewshot, limit}); empty = none")
    batch_size: int | None = Field(None, ge=1, le=1 << 16, description="requests per forward pass; null = evaluate.batch_size")
    include_path: str | None = Field(None, description="a folder of your own task YAMLs (a local JSON dataset each: dataset_path: json)")
    online: bool = Field(
        False, description="let tasks download their datasets from the Hugging Face Hub (cached in HF_HOME); false = offline, one message when a task needs the network")

    @model_validator(mode="before")
    @classmethod
    def _names_alone(cls, data):
        """A task given as its bare name: `tasks: [arc_easy]`."""
        if isinstance(data, dict) and isinstance(data.get("tasks"), list):
            data = {**data, "tasks": [{"name": t} if isinstance(t, str) else t for t in data["tasks"]]}
        return data


class EvaluateConfig(Section):
    """evaluate: val loss, perplexity, bits per byte, accuracy and (optionally) HellaSwag of the exported model."""

    model_dir: str | None = Field(None, description="the model to evaluate (an export, a checkpoint, any HF folder or hub id); null = train.export_dir")
    batch_size: int = Field(8, ge=1, le=1 << 16, description="sequences per forward pass")
    block_size: int | None = Field(None, ge=8, le=1 << 20, description="window length for val loss; null = model.block_size")
    max_windows: int | None = Field(None, ge=1, le=1 << 40, description="score at most this many val windows; null = the whole val split")
    hellaswag: str | None = Field(None, description="HellaSwag JSONL (original or preprocessed format); null = skip it")
    hellaswag_url: str | None = Field(None, description="download the HellaSwag JSONL from here (once, into prepare.download_dir)")
    hellaswag_limit: int | None = Field(None, ge=1, le=BIG, description="score only the first N HellaSwag items")
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig, description="lm-evaluation-harness tasks (off with no tasks)")
    metrics: list[str] = Field(
        default_factory=list, description="your own metrics: module:function names imported from the project folder, each called with the model, tokenizer and val tokens (code you run: docs/stages/evaluate.md)")
    metrics_file: str = Field("reports/metrics.json", min_length=1, description="where the metrics go (declared as DVC metrics)")

    @model_validator(mode="after")
    def _one_hellaswag(self):
        if self.hellaswag and self.hellaswag_url:
            check([("hellaswag_url", "set together with evaluate.hellaswag: keep one of them")])
        bad = [m for m in self.metrics if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", m)]
        if bad:
            check([("metrics", f"{bad[0]!r} is not module:function (e.g. my_metrics:rhyme_rate, for my_metrics.py in the project folder)")])
        return self


# ---------------------------------------------------------------------------------------------- sample


class SampleConfig(Section):
    """sample: text generated by the model."""

    model_dir: str | None = Field(None, description="the model to sample from (an export, a checkpoint, any HF folder or hub id); null = train.export_dir")
    prompts: list[str] = Field(default_factory=lambda: ["\n"], description="prompts, each sampled num_samples times")
    prompts_file: str | None = Field(None, description="a text file of prompts, used instead of prompts (see prompts_file_format)")
    prompts_file_format: Literal["lines", "whole"] = Field(
        "lines", description="lines: each non-empty line is a prompt; whole: the file is one prompt, newlines kept (nanoGPT's --start=FILE:)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="precision of generation; auto = the training precision on a GPU, fp32 on a CPU")
    num_samples: int = Field(2, ge=1, le=1 << 20, description="samples per prompt")
    max_new_tokens: int = Field(200, ge=1, le=1 << 20, description="tokens generated per sample at most")
    temperature: float = Field(0.8, ge=0, description="softmax temperature; 0 = greedy")
    top_k: int | None = Field(50, ge=1, le=1 << 24, description="sample among the k most likely tokens; null = all")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens with this much probability")
    seed: int = Field(1337, ge=0, le=MAX_SEED, description="seed of the sampler")
    stop_at_eot: bool = Field(True, description="stop a sample at the end-of-text token")
    out_dir: str = Field("reports", min_length=1, description="where samples.md and samples.jsonl go")


# ---------------------------------------------------------------------------------------------- report


class ReportConfig(Section):
    """report: training curves, metrics and samples in one page that reads offline."""

    out_dir: str = Field("reports", min_length=1, description="where report.md, report.html and plots/*.png go")


# ------------------------------------------------------------------------------------------------ all


@dataclass(frozen=True)
class ModelRef:
    """The model a stage reads, and the params key that chose it (for error messages)."""

    path: str
    key: str


class Params(Section):
    """The whole params.yaml. Every section has defaults, so a file may set only what it changes."""

    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    def model_for(self, stage: Literal["evaluate", "sample"]) -> ModelRef:
        """The model evaluate or sample reads: its own model_dir, else what train exports."""
        own = getattr(self, stage).model_dir
        return ModelRef(own, f"{stage}.model_dir") if own else ModelRef(self.train.export_dir, "train.export_dir")

    @property
    def eval_block_size(self) -> int:
        """Window length of the evaluate stage's val loss."""
        return self.evaluate.block_size or self.model.block_size

    def output_paths(self) -> dict[str, str]:
        """Every path a stage writes, by the key that sets it (sample and report write named files into their folder)."""
        samples, report = SamplesDir(self.sample.out_dir), ReportDir(self.report.out_dir)
        return {
            "prepare.out_dir": self.prepare.out_dir, "prepare.download_dir": self.prepare.download_dir,
            "tokenize.out_dir": self.tokenize.out_dir, "tokenize.metrics_file": self.tokenize.metrics_file,
            "train.out_dir": self.train.out_dir, "train.export_dir": self.train.export_dir, "train.metrics_dir": self.train.metrics_dir,
            "evaluate.metrics_file": self.evaluate.metrics_file,
            "sample.out_dir (samples.jsonl)": str(samples.jsonl), "sample.out_dir (samples.md)": str(samples.markdown),
            "report.out_dir (report.md)": str(report.markdown), "report.out_dir (report.html)": str(report.html),
            "report.out_dir (plots)": str(report.plots),
        }  # fmt: skip

    def input_paths(self) -> dict[str, str]:
        """Every local path a stage reads that no stage writes (globs cut at their first wildcard)."""
        found = {
            "prepare.source.path": self.prepare.source.path if self.prepare.source.kind == "files" else None,
            "prepare.val_source.path": self.prepare.val_source.path if self.prepare.val_source and self.prepare.val_source.kind == "files" else None,
            "evaluate.hellaswag": self.evaluate.hellaswag, "sample.prompts_file": self.sample.prompts_file,
            "evaluate.lm_eval.include_path": self.evaluate.lm_eval.include_path,
            **{f"tokenize.import_dirs[{i}]": path for i, path in enumerate(self.tokenize.import_dirs)},
            "train.deepspeed_config": self.train.deepspeed_config, "train.hostfile": self.train.hostfile,
            # A hub id is not a path; a local folder is.
            "model.init": self.model.init if not self.model.is_scratch and os.path.exists(self.model.init) else None,
            "tokenize.pretrained": self.tokenize.pretrained if self.tokenize.pretrained and os.path.exists(self.tokenize.pretrained) else None,
        }  # fmt: skip
        return {key: re.split(r"[*?\[]", path)[0] or "." for key, path in found.items() if path}

    @model_validator(mode="after")
    def _outputs_do_not_clobber(self):
        """A folder a stage replaces whole must not hold, or sit inside, anything else: not an input, not another output."""
        problems = []
        outputs, inputs = self.output_paths(), self.input_paths()
        for key in REPLACED_WHOLE:
            folder = _absolute(outputs[key])
            for other, path in {**outputs, **inputs}.items():
                if other == key:
                    continue
                what = "an input" if other in inputs else "another output"
                if _absolute(path) == folder:
                    problems.append((key, f"{outputs[key]} is also {other} ({what}): the stage replaces it whole; give each its own folder"))
                elif _inside(_absolute(path), folder):
                    problems.append((key, f"{outputs[key]} holds {other}={path} ({what}), which replacing the folder would delete; choose another folder"))
                elif _inside(folder, _absolute(path)) and other not in REPLACED_WHOLE:  # else reported from the other side
                    problems.append((key, f"{outputs[key]} is inside {other}={path} ({what}); choose a folder outside it"))
        # Every other path a stage writes (metrics files, the metrics folder, samples, the report): never an input,
        # never inside an input folder (the next run would read it as data), never a folder that holds an input.
        for key, path in outputs.items():
            if key in REPLACED_WHOLE:
                continue
            written = _absolute(path)
            for other, source in inputs.items():
                read = _absolute(source)
                if written == read:
                    problems.append((key, f"{path} is also {other} (an input): the stage would overwrite it; give it a path of its own"))
                elif _inside(read, written) and key not in WRITES_NEW_FILES_ONLY:
                    problems.append((key, f"{path} holds {other}={source} (an input), which the stage would write over; choose another folder"))
                elif _inside(written, read):
                    problems.append((key, f"{path} is inside {other}={source} (an input), so a later run would read what the stage"
                                          " writes there; choose a path outside it"))
        check(problems)
        return self

    @model_validator(mode="after")
    def _tokenizer_matches_model(self):
        # GPT-2 checkpoints and tiktoken's gpt2 encoding give identical ids: nanoGPT's fine-tuning flow (checked on load).
        gpt2_ids = self.tokenize.kind == "tiktoken" and self.tokenize.encoding == "gpt2"
        # A model gptpipe trained carries its tokenizer, of any kind: train checks that the tokens use its ids.
        own = not self.model.is_scratch and saved_tokenizer(self.model.init) is not None
        # Imported ids are checked against the model when train loads them (nanoGPT's gpt2 ids fit GPT-2 checkpoints).
        if not self.model.is_scratch and self.tokenize.kind not in ("hf", "import") and not gpt2_ids and not own:
            init = self.model.init
            if not os.path.exists(os.path.expanduser(init)):
                # Not a folder here: either a mistyped path or a hub id; say which, rather than "a pretrained checkpoint".
                if os.path.isabs(init) or init.startswith((".", "~")) or init.count("/") > 1:
                    check([("model.init", f"{init!r} not found (no such folder; a hub id has the form name or owner/name)")])
                what = ("is no folder here, so it names a model on the Hugging Face hub (downloaded with network access, or read"
                        " from the HF_HOME cache; if you meant a folder, check the path)")
            else:
                what = "is a pretrained checkpoint"
            check(
                [
                    (
                        "tokenize.kind",
                        f"is '{self.tokenize.kind}' but model.init={init!r} {what}: its own"
                        f" tokenizer is needed (tokenize.kind=hf, tokenize.pretrained={init!r}; for GPT-2 checkpoints"
                        " tokenize.kind=tiktoken with encoding gpt2 also works)",
                    )
                ]
            )
        return self


SECTIONS = tuple(Params.model_fields)
# Folders a stage builds beside their place and swaps in whole (files.building_dir).
REPLACED_WHOLE = ("prepare.out_dir", "tokenize.out_dir", "train.export_dir")
# Output folders whose stage only adds files of its own naming (a run folder, a download named by its URL's hash),
# so an input kept inside one (model.init=checkpoints/run-.../step-...) is never written over.
WRITES_NEW_FILES_ONLY = ("train.out_dir", "prepare.download_dir")


def _absolute(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))  # through symlinks: a link to the corpus is the corpus


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)
