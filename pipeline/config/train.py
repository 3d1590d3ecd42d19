"""train's params: the DeepSpeed run, its keys flat but grouped by concern, each group checking its own fields;
the batch arithmetic derived from them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import BIG, CADENCE, KEEPS_RUN, MAX_SEED, Section, check
from pipeline.errors import UserError


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


class TrainPart(Section):
    """Base of the train.* groups below: each adds the problems among its own fields, so one message names them all.
    A group reads only its own fields and so validates alone; rules across groups are TrainConfig's."""

    def problems(self) -> list[tuple[str, str]]:
        return []

    @model_validator(mode="after")
    def _checks(self):
        check(self.problems())
        return self


class LengthConfig(TrainPart):
    """How long to train: exactly one of max_steps and epochs."""

    max_steps: int | None = Field(300, ge=1, le=BIG, description="optimizer steps in total (a resumed run continues up to this); null when epochs is set", json_schema_extra=KEEPS_RUN)
    epochs: float | None = Field(
        None, gt=0, le=1e6, description="passes over the train split instead of max_steps (set max_steps: null): steps = epochs x windows / global batch", json_schema_extra=KEEPS_RUN)

    def problems(self) -> list[tuple[str, str]]:
        problems = []
        if (self.max_steps is None) == (self.epochs is None):
            fix = "set max_steps: null to train by epochs" if self.epochs is not None else "set one of them"
            problems.append(("max_steps", f"train.max_steps and train.epochs: exactly one must be set ({fix})"))
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

    log_interval: int = Field(10, ge=1, le=BIG, description="log train metrics every N steps", json_schema_extra=CADENCE)
    eval_interval: int = Field(50, ge=1, le=BIG, description="evaluate val loss every N steps (and at the end)", json_schema_extra=CADENCE)
    eval_batches: int = Field(
        4, ge=1, le=1 << 20, description="val windows per evaluation = eval_batches x micro_batch_size, a fixed set shared by all processes", json_schema_extra=KEEPS_RUN)
    eval_batch_size: int | None = Field(
        None, ge=1, le=1 << 16, description="sequences per forward pass of training's evaluations (val loss, HellaSwag); null = micro_batch_size. The windows scored stay the same, so only speed and memory change", json_schema_extra=KEEPS_RUN)
    eval_at_start: bool = Field(False, description="evaluate before the first step (a pretrained model's val loss before fine-tuning)", json_schema_extra=KEEPS_RUN)
    early_stopping_patience: int | None = Field(
        None, ge=1, le=1 << 20, description="stop after this many evaluations without a val loss improvement of at least early_stopping_min_delta; null = off", json_schema_extra=KEEPS_RUN)
    early_stopping_min_delta: float = Field(0.0, ge=0, description="the smallest val loss decrease that counts as an improvement for early stopping", json_schema_extra=KEEPS_RUN)
    hellaswag_interval: int | None = Field(
        None, ge=1, le=BIG, description="score HellaSwag (evaluate.hellaswag) every N steps, logged as hellaswag/acc_norm; null = off", json_schema_extra=CADENCE)
    hellaswag_limit: int | None = Field(200, ge=1, le=BIG, description="HellaSwag items scored during training; null = evaluate.hellaswag_limit", json_schema_extra=KEEPS_RUN)
    sample_interval: int | None = Field(None, ge=1, le=BIG, description="generate from sample_prompts every N steps into the training log and report; null = off", json_schema_extra=CADENCE)
    sample_prompts: list[str] = Field(default_factory=lambda: ["\n"], description="prompts sampled during training (one sample each, top-k 50, a fixed seed)", json_schema_extra=KEEPS_RUN)
    sample_max_new_tokens: int = Field(64, ge=1, le=1 << 16, description="tokens generated per prompt during training", json_schema_extra=KEEPS_RUN)
    target_loss: float | None = Field(
        None, gt=0, le=1e4, description="a val loss to reach: the first in-loop evaluation at or below it records the steps, tokens, model FLOPs and seconds it took (metrics.json: target); null = off", json_schema_extra=KEEPS_RUN)
    stop_at_target: bool = Field(False, description="end the run (then export) at the first evaluation that reaches target_loss", json_schema_extra=KEEPS_RUN)
    save_interval: int = Field(
        100, ge=0, le=BIG, description="checkpoint every N steps (and at the end); 0 = only at the end (and, with export: best, at each improvement)", json_schema_extra=CADENCE)
    keep_last: int = Field(2, ge=1, le=1 << 20, description="checkpoints kept, plus the best by val loss", json_schema_extra=KEEPS_RUN)

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

    @classmethod
    def cadence_keys(cls) -> list[str]:
        """The train.* intervals marked CADENCE: how often something happens along the run (what plan's probe turns off)."""
        return [name for name, field in cls.model_fields.items() if (field.json_schema_extra or {}).get("cadence")]

    def problems(self) -> list[tuple[str, str]]:
        """The rules across groups, after each group's own (through super()): the same keys and messages."""
        problems = []
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            problems.append(("warmup_steps", f"{self.warmup_steps} is more than train.max_steps={self.max_steps}"))
        return [*super().problems(), *problems]

    def total_steps(self, train_windows: int, batch: Batch) -> int:
        """max_steps, or the steps epochs passes over train_windows take at this global batch."""
        if self.max_steps is not None:
            return self.max_steps
        steps = max(1, math.ceil(self.epochs * train_windows / batch.global_size))
        if self.warmup_steps > steps:
            raise UserError(f"train.warmup_steps={self.warmup_steps} is more than the {steps} steps train.epochs={self.epochs:g} gives"
                            f" ({train_windows:,} windows, {batch.global_size} per step): lower warmup_steps or raise epochs")
        return steps

    @property
    def eval_windows(self) -> int:
        """Val windows scored at each in-training evaluation, whatever the number of processes."""
        return self.eval_batches * self.micro_batch_size
