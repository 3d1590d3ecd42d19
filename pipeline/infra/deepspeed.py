"""Everything that calls DeepSpeed's engine: the generated config, the engine and its optimizer groups, one
optimizer step with clipping, and the whole model's weights gathered from it."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as torch_dist

from pipeline.config.train import Batch, TrainConfig
from pipeline.errors import UserError
from pipeline.files import absent
from pipeline.infra.deepspeed_fixes import deepspeed_environment, eager_muon, group_timeout, muon_tags_kept, shm_op_skipped
from pipeline.output import Echo, silent

def deepspeed_config(train: TrainConfig, batch: Batch) -> dict:
    """The DeepSpeed JSON for train.*, one key at a time; the lr schedule is set by the loop each step."""
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage > 0:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if train.optimizer == "muon":
            zero["reduce_scatter"] = False  # ZeRO 3's Muon needs each whole gradient ("Muon and reduce scatter cannot be used together")
    return {
        "train_batch_size": batch.global_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.grad_accum,
        # ZeRO 0 in fp32: the loop clips (and so learns the norm) in one pass; DeepSpeed would compute it again.
        "gradient_clipping": 0.0 if clips_in_loop(train) else train.clip,
        "optimizer": optimizer_config(train),
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def optimizer_config(train: TrainConfig) -> dict:
    """DeepSpeed's optimizer block: AdamW, or its Muon (MuonWithAuxAdam: Muon on the parameters tagged use_muon,
    AdamW on the others). The groups (pipeline/train/optimizer.py) carry each one's lr and weight decay."""
    adam = {
        "lr": train.lr,
        "betas": [train.beta1, train.beta2],
        "eps": train.eps,
        "weight_decay": train.weight_decay,
        # torch's AdamW needs no compiled op; DeepSpeed's CPU Adam is used when offloading.
        "torch_adam": not train.offload_optimizer,
        "adam_w_mode": True,
    }
    if train.optimizer == "muon":
        # ns_method "standard": the quintic Newton-Schulz of the published recipe (DeepSpeed's default "gram" runs in
        # fp16, which a CPU lacks, and differs in its last digits across matrix shapes).
        return {"type": "Muon", "params": {**adam, "muon_lr": train.muon_lr, "momentum": train.muon_momentum, "ns_method": "standard"}}
    # torch's fused AdamW kernel (CPU and GPU) beats the foreach one.
    return {"type": "AdamW", "params": {**adam, **({"fused": True} if not train.offload_optimizer else {})}}


def read_user_config(path: str) -> dict:
    """train.deepspeed_config's JSON object, or one message naming the file (and the line)."""
    if not Path(path).is_file():
        raise UserError(f"train.deepspeed_config: {path} {absent(path)}")
    try:
        user = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"train.deepspeed_config: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise UserError(f"train.deepspeed_config: {path}{where}: invalid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(user, dict):
        raise UserError(f"train.deepspeed_config: {path} must hold a JSON object")
    return user


def owned_keys(train: TrainConfig, generated: dict) -> dict[tuple[str, ...], tuple[str, object]]:
    """The DeepSpeed keys gptpipe's schema owns: path in the JSON -> (the param that sets it, the value the params give).
    The loop, the checkpoint reader, clipping, plan and doctor read those params, so the JSON may not say otherwise."""
    adam = generated["optimizer"]["params"]
    device = {True: "cpu", False: "none"}
    owned = {
        ("train_batch_size",): ("train.micro_batch_size x train.grad_accum (or train.global_batch_tokens) x processes", generated["train_batch_size"]),
        ("train_micro_batch_size_per_gpu",): ("train.micro_batch_size", generated["train_micro_batch_size_per_gpu"]),
        ("gradient_accumulation_steps",): ("train.grad_accum (or train.global_batch_tokens)", generated["gradient_accumulation_steps"]),
        ("gradient_clipping",): ("train.grad_clip", train.clip),
        ("zero_optimization", "stage"): ("train.zero_stage", train.zero_stage),
        ("zero_optimization", "offload_optimizer", "device"): ("train.offload_optimizer", device[train.offload_optimizer]),
        ("zero_optimization", "offload_param", "device"): ("train.offload_params", device[train.offload_params]),
        ("bf16", "enabled"): ("train.precision", train.precision == "bf16"),
        ("bfloat16", "enabled"): ("train.precision", train.precision == "bf16"),
        ("fp16", "enabled"): ("train.precision", train.precision == "fp16"),
        ("optimizer", "type"): ("train.optimizer", generated["optimizer"]["type"]),
        ("optimizer", "params", "lr"): ("train.lr", train.lr),
        ("optimizer", "params", "betas"): ("train.beta1 and train.beta2", [train.beta1, train.beta2]),
        ("optimizer", "params", "eps"): ("train.eps", train.eps),
        ("optimizer", "params", "weight_decay"): ("train.weight_decay", train.weight_decay),
        ("optimizer", "params", "adam_w_mode"): ("train.optimizer", True),
    }
    if train.optimizer == "muon":
        owned[("optimizer", "params", "muon_lr")] = ("train.muon_lr", adam["muon_lr"])
        owned[("optimizer", "params", "momentum")] = ("train.muon_momentum", adam["momentum"])
    if train.zero_stage == 3:  # the export gathers the whole model through it
        owned[("zero_optimization", "stage3_gather_16bit_weights_on_model_save")] = ("train.zero_stage", True)
    return owned


def same_value(given, expected) -> bool:
    if isinstance(expected, bool) or isinstance(given, bool):
        return given is expected
    if isinstance(expected, str):  # DeepSpeed reads optimizer names and devices in any case; Adam with adam_w_mode is AdamW
        names = {"adamw": {"adamw", "adam"}}.get(expected.lower(), {expected.lower()})
        return isinstance(given, str) and given.lower() in names
    if isinstance(expected, list):
        return isinstance(given, list) and len(given) == len(expected) and all(same_value(g, e) for g, e in zip(given, expected))
    return isinstance(given, (int, float)) and float(given) == float(expected)


def resolve_user_config(train: TrainConfig, generated: dict, path: str | None) -> tuple[dict, list[str]]:
    """The one engine config: the generated one with a user's DeepSpeed JSON resolved into it; and what the JSON added.

    As in Hugging Face's DeepSpeed integration, a key the params own (owned_keys) may appear in the JSON only as "auto"
    or with the value the params give; any other value is one message naming the train.* key to set instead. A
    "scheduler" block may hold only "auto" values (the loop sets the lr each step, from train.schedule). Everything
    else (communication, bucket sizes, activation checkpointing, ...) passes through; "auto" there means
    DeepSpeed's default.
    """
    if not path:
        return generated, []
    user = read_user_config(path)
    owned = owned_keys(train, generated)
    conflicts, added = [], []

    def walk(node: dict, prefix: tuple[str, ...]) -> dict:
        kept = {}
        for key, value in node.items():
            at = (*prefix, key)
            name = ".".join(at)
            if at in owned:
                param, expected = owned[at]
                if value != "auto" and not same_value(value, expected):
                    conflicts.append(f"{name}={json.dumps(value)} where {param} gives {json.dumps(expected)}")
                continue  # the generated value stands: it encodes the same setting as the engine needs it
            if at == ("scheduler",):
                params = value.get("params") if isinstance(value, dict) else None
                if value != "auto" and not (isinstance(params, dict) and all(v == "auto" for v in params.values())):
                    conflicts.append("a scheduler with values of its own, where train.schedule, train.warmup_steps, train.lr and"
                                     " train.min_lr give the schedule (the loop sets the lr every step): remove it or make its params \"auto\"")
                continue
            holds_owned = any(len(o) > len(at) and o[: len(at)] == at for o in owned)
            if isinstance(value, dict):
                kept[key] = walk(value, at)
            elif holds_owned:  # "optimizer": "auto" keeps gptpipe's block; anything else would replace what the params set
                if value != "auto":
                    conflicts.append(f"{name}={json.dumps(value)}, which must be an object (or \"auto\") as it holds what the params set")
            elif value == "auto":
                added.append(f"{name}: auto (DeepSpeed's default)")
            else:
                kept[key] = value
                before = generated_at(generated, at)
                added.append(f"{name}: {json.dumps(before)} -> {json.dumps(value)}" if before is not None else f"{name}: {json.dumps(value)}")
        return kept

    passed = walk(user, ())
    if conflicts:
        raise UserError(f"train.deepspeed_config: {path} sets " + "; ".join(conflicts)
                        + '. Set those params instead (or write "auto", as for Hugging Face\'s DeepSpeed integration)')
    return _merge(generated, passed), added


def generated_at(config: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def check_precision(train: TrainConfig) -> None:
    """UserError, before anything is written, when this machine's accelerator lacks train.precision."""
    if train.precision == "fp32":
        return
    accel = accelerator()
    supported = accel.is_bf16_supported() if train.precision == "bf16" else accel.is_fp16_supported()
    if not supported:
        raise UserError(f"train.precision={train.precision} is not supported on this machine's {accel._name} accelerator:"
                        " use fp32 (or bf16 where supported; `gptpipe doctor` shows which)")


def engine_config(train: TrainConfig, batch: Batch, echo: Echo = silent) -> dict:
    """The DeepSpeed config a run trains with: generated from train.*, a user JSON resolved into it (resolve_user_config)."""
    check_precision(train)
    ds_config, added = resolve_user_config(train, deepspeed_config(train, batch), train.deepspeed_config)
    for change in added:
        echo(f"train: {train.deepspeed_config} sets {change}")
    return ds_config


@contextmanager
def model_init(ds_config: dict, timeout_s: int) -> Iterator[None]:
    """Where a model to train from scratch is built: under ZeRO-3, inside deepspeed.zero.Init, so each process only
    ever holds its partition of the weights (a model larger than one process's memory can be made).

    transformers does this itself while an HfDeepSpeedConfig is alive, and then runs its weight initialisation on
    gathered parameters; without that, _init_weights would touch empty partitions and leave PyTorch's defaults.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    alive = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: hold it while building
    try:
        with deepspeed_world(timeout_s):  # zero.Init makes process groups too
            yield
    finally:
        del alive


def accelerator():
    """DeepSpeed's accelerator, picked once at its first get_accelerator() inside deepspeed_environment (DS_ACCELERATOR
    set to cpu on a machine without CUDA, unless the user chose; pipeline/infra/deepspeed_fixes.py)."""
    with deepspeed_environment():
        from deepspeed.accelerator import get_accelerator

        return get_accelerator()


@contextmanager
def deepspeed_world(timeout_s: int) -> Iterator[None]:
    """While DeepSpeed makes its process groups (the process group itself is made first, by init_distributed) and its
    engine or zero.Init's partitions: its communication backend without the shared-memory op (shm_op_skipped), and
    torch's default timeout the world's (group_timeout), then put back."""
    import deepspeed

    accelerator()
    with shm_op_skipped():
        # DeepSpeed's own view of the process group (zero.Init asks it for the world size before any engine exists).
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
        with group_timeout(timeout_s):
            yield


@contextmanager
def training_corrections(train: TrainConfig) -> Iterator[None]:
    """The DeepSpeed corrections that hold while a whole run trains, entered once by the train setup and left at its
    end: the environment DeepSpeed builds ops in (it may build one at any call), and on a CPU Muon's update run
    eagerly (DeepSpeed calls it inside every backward and step)."""
    with deepspeed_environment():
        with eager_muon() if train.optimizer == "muon" and not torch.cuda.is_available() else nullcontext():
            yield


def build_engine(model: torch.nn.Module, train: TrainConfig, ds_config: dict, groups: list[dict]) -> object:
    """The DeepSpeed engine that trains model with ds_config (engine_config) and these optimizer groups (each with
    its peak lr; pipeline/train/optimizer.py)."""
    accelerator()
    import deepspeed

    with deepspeed_environment(), deepspeed_world(train.collective_timeout), muon_tags_kept(groups):
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    # Each group's peak lr as a multiple of train.lr, by position: the schedule's lr times it, every step (set_lr).
    # Kept here, not in the groups, because a checkpoint's groups (universal ones too) need not carry extra keys.
    engine.gptpipe_lr_factors = [group["lr"] / train.lr for group in engine.optimizer.param_groups]
    if torch_dist.get_world_size() == 1 and train.zero_stage == 0:
        # One process has nothing to all-reduce: skip DeepSpeed's flatten, reduce and unflatten of every gradient.
        engine.enable_backward_allreduce = False
    if train.compile:
        engine.compile()  # torch.compile of the module in place: its parameter names, and so the checkpoints, stay the same
    return engine


def set_lr(engine, lr: float) -> None:
    """The schedule's lr (of train.lr's curve) onto every group, each at its own multiple."""
    factors = getattr(engine, "gptpipe_lr_factors", None) or [1.0] * len(engine.optimizer.param_groups)
    for group, factor in zip(engine.optimizer.param_groups, factors):
        group["lr"] = lr * factor


def clips_in_loop(train: TrainConfig) -> bool:
    """ZeRO 0 in fp32: DeepSpeed keeps no gradient norm there, so the loop clips (one pass gives the norm too)."""
    return train.zero_stage == 0 and train.precision == "fp32"


def optimizer_step(engine, boundary: bool, grad_clip: float) -> float | None:
    """engine.step() after a micro step; at an accumulation boundary, return the global gradient norm.

    ZeRO stages and DeepSpeed's bf16/fp16 optimizers keep the norm they clip with. In plain fp32 data
    parallelism every rank holds the full averaged gradients before the step, so clipping them here gives
    the global norm in the same pass (clips_in_loop: DeepSpeed's own clipping is off then).
    """
    norm = None
    if boundary and engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf, foreach=True))
    engine.step()
    if not boundary:
        return None
    tracked = engine.get_global_grad_norm()
    return float(tracked) if tracked is not None else norm


def full_state_dict(engine, dtype: torch.dtype) -> dict | None:
    """The whole model's weights in dtype on rank 0 (None elsewhere); call on every rank (ZeRO-3 gathers).

    With bf16/fp16 training these are the fp32 master weights the optimizer holds, cast once to dtype, not the
    low-precision copies the forward pass used.
    """
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # every rank takes part; rank 0 gets it
    else:
        state = module.state_dict() if torch_dist.get_rank() == 0 else None
    masters = _master_weights(engine) if engine.bfloat16_enabled() or engine.fp16_enabled() else {}
    if torch_dist.get_rank() != 0:
        return None
    return {name: masters.get(name, tensor).detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
            for name, tensor in state.items()}


def _master_weights(engine) -> dict[str, torch.Tensor]:
    """name -> fp32 master copy of each parameter (tied names included); ZeRO-3 gathers, so every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    optimizer, masters = engine.optimizer, {}
    # ZeRO 0 in bf16/fp16 runs DeepSpeed's unfused optimizer: fp32 copies side by side with the module's groups.
    by_id = {id(low): high for lows, highs in zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", []))
             for low, high in zip(lows, highs)}
    for name, param in engine.module.named_parameters(remove_duplicate=False):
        master = by_id.get(id(param))
        if master is None:
            master = safe_get_full_fp32_param(param)
        if master is not None:
            masters[name] = master.view(param.ds_shape if hasattr(param, "ds_shape") else param.shape)
    return masters


@dataclass(frozen=True)
class Installation:
    """What `gptpipe doctor` reports of DeepSpeed: its version, accelerator, precisions and ops."""

    version: str
    accelerator: str
    supports: dict[str, bool]  # precision -> supported by the accelerator
    prebuilt_ops: list[str]  # built at install time (DS_BUILD_OPS=1)
    compatible_ops: list[str]  # can be JIT-compiled here
    failed_probes: list[str]


def deepspeed_installation() -> Installation:
    """DeepSpeed as installed here; raises what importing it raises (a broken install, missing CUDA libraries)."""
    accel = accelerator()
    import deepspeed
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    compatible, failed = [], []
    for name, builder in ALL_OPS.items():
        try:  # is_compatible only probes headers and libraries, it compiles nothing
            if builder.is_compatible(verbose=False):
                compatible.append(name)
        except Exception as e:  # noqa: BLE001 - reported by doctor; a failing probe means "cannot build", as in ds_report
            failed.append(f"{name} ({type(e).__name__}: {e})")
    return Installation(
        version=deepspeed.__version__, accelerator=accel._name,
        supports={"fp32": True, "bf16": bool(accel.is_bf16_supported()), "fp16": bool(accel.is_fp16_supported())},
        prebuilt_ops=[name for name in ALL_OPS if installed_ops.get(name)], compatible_ops=compatible, failed_probes=failed,
    )
