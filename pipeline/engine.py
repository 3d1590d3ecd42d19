"""Everything DeepSpeed and torch.distributed: process group, launcher, generated config, engine, checkpoint I/O."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as torch_dist

from pipeline.config import Batch, TrainConfig
from pipeline.errors import UserError
from pipeline.output import Echo, silent

# Dense peak TFLOP/s per device for MFU. CPU figures were measured on this project's 2-core machines
# (a bf16 and an fp32 matmul at their best); GPU figures are the vendors' dense numbers: bf16/fp16 tensor cores
# (TF32 is half of that), and plain fp32 without tensor cores, which is what fp32 gets with TF32 off.
CPU_PEAK_TFLOPS = {"bf16": 0.35, "fp16": 0.16, "fp32": 0.16}
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}
GPU_FP32_TFLOPS = {"H200": 67.0, "H100": 67.0, "A100": 19.5, "L40S": 91.6, "A10G": 31.2, "L4": 30.3, "V100": 15.7}
NO_TF32 = {"V100"}  # before Ampere: fp32 never runs on tensor cores

# Keys that the data path derives from train.* itself: a user JSON may not change them.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Set when init_distributed made a world of one itself: the variables it sets are not a launcher's.
_own_world = False


def local_rank() -> int | None:
    """This process's index on its node when a launcher started it (LOCAL_RANK), else None."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None and not _own_world else None


def is_launched() -> bool:
    """True inside a process the deepspeed launcher (or torchrun) started."""
    return local_rank() is not None


def default_device() -> torch.device:
    return torch.device("cuda", local_rank() or 0) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(single_process_group: bool = True, timeout_s: int = 600) -> Dist:
    """Join the launcher's process group, or (single_process_group) create a group of one as DeepSpeed needs.

    Without single_process_group, a process no launcher started gets a world of one and no group (evaluate).
    A collective that waits more than timeout_s for another process raises instead of hanging forever.
    """
    if not is_launched() and not single_process_group:
        return Dist(0, 1, 0, default_device())
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say so, rather than have DeepSpeed warn it guessed
    import deepspeed

    # The deepspeed launcher sets these; a plain `python stages/train.py` gets a world of one.
    if "RANK" not in os.environ:
        global _own_world
        _own_world = True
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    # DeepSpeed makes its data-parallel groups with new_group(), which takes torch's default (30 minutes for gloo),
    # not the world's timeout: every group of this process gets the same one, so no collective hangs longer.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s), verbose=False)
    device = default_device()
    if cuda:
        torch.cuda.set_device(device)
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank() or 0, device)


def leave_process_group() -> None:
    """End a launched process's part in its group once every rank is done: a process that exits with gloo's
    threads still running can abort ("terminate called without an active exception", exit -6)."""
    if is_launched() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    return {
        "train_batch_size": batch.global_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.grad_accum,
        # ZeRO 0 in fp32: the loop clips (and so learns the norm) in one pass; DeepSpeed would compute it again.
        "gradient_clipping": 0.0 if clips_in_loop(train) else train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [train.beta1, train.beta2],
                "eps": train.eps,
                "weight_decay": train.weight_decay,
                # torch's AdamW needs no compiled op, and its fused kernel (CPU and GPU) beats the foreach one;
                # DeepSpeed's CPU Adam is used when offloading.
                "torch_adam": not train.offload_optimizer,
                **({"fused": True} if not train.offload_optimizer else {}),
                "adam_w_mode": True,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def merge_user_config(generated: dict, path: str | None) -> tuple[dict, list[str]]:
    """Put a user's DeepSpeed JSON on top of the generated one; return it and the keys it changed."""
    if not path:
        return generated, []
    try:
        user = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"train.deepspeed_config: {path} not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"train.deepspeed_config: {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(user, dict):
        raise UserError(f"train.deepspeed_config: {path} must hold a JSON object")
    fixed = [k for k in BATCH_KEYS if k in user and user[k] != generated[k]]
    if fixed:
        raise UserError(
            f"train.deepspeed_config: {path} sets {', '.join(fixed)}, which gptpipe derives from train.micro_batch_size,"
            " train.grad_accum / train.global_batch_tokens and the world size: set those params instead"
        )
    changed: list[str] = []
    return _merge(generated, user, "", changed), changed


def _merge(base: dict, top: dict, prefix: str, changed: list[str]) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, f"{prefix}{key}.", changed)
        else:
            if key in base and base[key] != value:
                changed.append(f"{prefix}{key}: {base[key]!r} -> {value!r}")
            out[key] = value
    return out


def inference_dtype(train: TrainConfig) -> torch.dtype:
    """What evaluate and sample run in: the training precision on a GPU; fp32 on a CPU, where bf16 gains little
    outside matmuls and changes the numbers."""
    if torch.cuda.is_available() and train.precision != "fp32":
        return torch.bfloat16 if train.precision == "bf16" else torch.float16
    return torch.float32


def check_precision(train: TrainConfig) -> None:
    """UserError, before anything is written, when this machine's accelerator lacks train.precision."""
    if train.precision == "fp32":
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    supported = accel.is_bf16_supported() if train.precision == "bf16" else accel.is_fp16_supported()
    if not supported:
        raise UserError(f"train.precision={train.precision} is not supported on this machine's {accel._name} accelerator:"
                        " use fp32 (or bf16 where supported; `gptpipe doctor` shows which)")


def engine_config(train: TrainConfig, batch: Batch, echo: Echo = silent) -> dict:
    """The DeepSpeed config a run trains with: generated from train.*, a user JSON merged on top."""
    check_precision(train)
    ds_config, changed = merge_user_config(deepspeed_config(train, batch), train.deepspeed_config)
    for change in changed:
        echo(f"train: {train.deepspeed_config} overrides {change}")
    return ds_config


@contextmanager
def model_init(ds_config: dict) -> Iterator[None]:
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
        yield
    finally:
        del alive


def build_engine(model: torch.nn.Module, train: TrainConfig, ds_config: dict) -> object:
    """The DeepSpeed engine that trains model with ds_config (engine_config). AdamW decays matrices only (not
    biases or norm gains)."""
    import deepspeed

    decay = [p for p in model.parameters() if p.requires_grad and _ndim(p) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and _ndim(p) < 2]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    if torch_dist.get_world_size() == 1 and train.zero_stage == 0:
        # One process has nothing to all-reduce: skip DeepSpeed's flatten, reduce and unflatten of every gradient.
        engine.enable_backward_allreduce = False
    if train.compile:
        engine.compile()  # torch.compile of the module in place: its parameter names, and so the checkpoints, stay the same
    return engine


def _ndim(p: torch.Tensor) -> int:
    """A parameter's dimensions, also when ZeRO-3 has partitioned it into a flat placeholder."""
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def clips_in_loop(train: TrainConfig) -> bool:
    """ZeRO 0 in fp32: DeepSpeed keeps no gradient norm there, so the loop clips (one pass gives the norm too)."""
    return train.zero_stage == 0 and train.precision == "fp32"


def step(engine, boundary: bool, grad_clip: float) -> float | None:
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


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if torch_dist.get_world_size() == 1:
        return [float(v) for v in values]  # a world of one: nothing to add
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when flag is true on at least one: all ranks then take the same branch."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def broadcast(obj, src: int = 0):
    """rank src's obj on every rank."""
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def collective_failure(e: BaseException) -> str | None:
    """What a failed collective means for the user ("frozen" or "gone"), or None when e is something else."""
    text = str(e)
    if isinstance(e, RuntimeError) and re.search(r"[Tt]imed out|[Tt]imeout", text):
        return "frozen"
    if isinstance(e, RuntimeError) and re.search(r"Connection (closed|reset)|Broken pipe|connection refused", text, re.I):
        return "gone"
    return None


def unresponsive_ranks(dist: Dist, wait_s: float) -> list[int]:
    """After a collective failed: the ranks that do not check in within wait_s through the rendezvous store.

    Every live rank writes its key and then waits for the others' keys, so the ones still missing are the frozen
    or dead ones. Empty when the store itself is gone (the rendezvous host died) or the world is one process.
    """
    if dist.world_size == 1:
        return []
    try:
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=max(1.0, wait_s)))  # the store lives in rank 0: it may be the frozen one
        store.set(f"gptpipe/alive/{dist.rank}", "1")
        keys = [f"gptpipe/alive/{r}" for r in range(dist.world_size)]
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not store.check(keys):
            time.sleep(0.2)
        return [r for r, key in enumerate(keys) if not store.check([key])]
    except (RuntimeError, ValueError, OSError):
        return []


def barrier() -> None:
    torch_dist.barrier()


def save_engine(engine, folder: Path, tag: str) -> None:
    """DeepSpeed's save (on every rank); gptpipe writes its own `latest` pointer once all ranks are done.

    The universal-checkpoint marker goes in too, so the checkpoint can be converted for another world size.
    """
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    if engine.global_rank == 0:
        # DeepSpeed rewrites its recovery scripts in the run folder in place on every save; after `dvc repro` they
        # may be hard links into DVC's cache (cache.type hardlink), which an in-place write would corrupt.
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            (folder / script).unlink(missing_ok=True)
    engine.save_checkpoint(str(folder), tag=tag, client_state=info, save_latest=False)


def partitioned_optimizer(checkpoint: Path) -> bool:
    """True when a checkpoint's optimizer state is split across the processes that saved it (ZeRO 1-3, and the
    bf16 optimizer): it then loads on another number of processes only after conversion to a universal checkpoint."""
    return any(checkpoint.glob("*optim_states.pt"))


def convert_to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal: checkpoint (one step's folder) -> out, a checkpoint that any world size loads
    (each parameter's fp32 weights and Adam moments, whole). In this process, loading weights-only, quietly."""
    import argparse
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)
    log = io.StringIO()
    try:
        with safe_unpickling(), redirect_stdout(log), redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - DeepSpeed's converter fails in many ways; each ends in this one message
        tail = "; ".join(log.getvalue().strip().splitlines()[-3:])
        raise UserError(f"train: converting {checkpoint} to a universal checkpoint failed ({type(e).__name__}: {e}; {tail})") from None


def load_engine(engine, folder: Path, tag: str, universal: bool = False) -> None:
    """Weights and optimizer state from folder/tag; universal: a checkpoint in DeepSpeed's universal format.

    The format is DeepSpeed's config key checkpoint.load_universal, which it reads only when loading: set per load,
    since one run may load a universal checkpoint (to resume) and then its own (the best, to export).
    """
    engine._config.load_universal_checkpoint = universal
    settings = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    with safe_unpickling():
        path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if universal:
        # Two slips of DeepSpeed's ZeRO-3 universal loader, undone here. It gives every group the first group's
        # settings (weight decay on biases and norms too): they are this run's settings, identical to the saved
        # ones, so put them back. And it hands every group one shared `step` tensor, which torch's AdamW then
        # advances once per group per step (wrong bias correction from the second group on): give each its own.
        for group, setting in zip(engine.optimizer.param_groups, settings):
            group.update(setting)
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    if path is None:
        raise UserError(f"checkpoint {folder / tag} could not be loaded by DeepSpeed (incomplete or from another setup)")


def _checkpoint_classes() -> list:
    """The classes DeepSpeed's checkpoint files hold besides tensors and containers (found by loading every file
    of ZeRO 0-3, fp32 and bf16 with weights_only=True): plain values, whose unpickling runs none of the file's code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def safe_unpickling() -> Iterator[None]:
    """Every torch.load inside refuses a pickle that would run code, DeepSpeed's own loads included (they ask for
    weights_only=False): TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that, and only DeepSpeed's value classes are allowed."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_checkpoint_classes()):
            yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def check_loadable(path: Path) -> str | None:
    """Why torch must not or cannot load path (code in its pickle, a broken archive), or None when it loads safely.

    Memory-maps the tensors, so only the pickled structure is read: cheap even for a large file.
    """
    try:
        with safe_unpickling():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "an object gptpipe does not load"
        return f"it holds {what}, which loading would run as code: refused"
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        return f"not a readable torch file ({str(e).splitlines()[0][:120]})"
    return None


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


def peak_tflops(train: TrainConfig, device: torch.device) -> float:
    if train.peak_tflops:
        return train.peak_tflops
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32  # what use_tf32 set: the peak follows what the matmuls really do
        return gpu_peak_tflops(torch.cuda.get_device_name(device), train.precision, tf32) or 100.0
    return CPU_PEAK_TFLOPS[train.precision]


def gpu_peak_tflops(name: str, precision: str, tf32: bool) -> float | None:
    """The dense peak of the GPU called name at this precision; fp32 counts TF32's peak only when TF32 is on."""
    for key, tensor_cores in GPU_PEAK_TFLOPS.items():
        if key in name:
            if precision != "fp32":
                return tensor_cores
            return tensor_cores / 2 if tf32 and key not in NO_TF32 else GPU_FP32_TFLOPS[key]
    return None


def use_tf32(on: bool) -> None:
    """train.tf32: fp32 matmuls and convolutions on tensor cores in TF32 (CUDA only; a CPU has no such mode)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


# ------------------------------------------------------------------------------------------- launcher

HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\d+)\s*(#.*)?$")
EXPECTED_LINE = "expected `HOSTNAME slots=N`, e.g. `worker-1 slots=8` (see hostfile.example)"
HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def valid_host(host: str) -> bool:
    """A DNS host name (RFC 1123 labels; `_` allowed, as some clusters use it) or an IP address."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return len(host) <= 253 and all(HOST_LABEL.match(label) for label in host.rstrip(".").split("."))


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """DeepSpeed's hostfile as (host, slots) pairs; UserError listing every bad line as file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: hostfile not found: create it (see hostfile.example) or unset train.hostfile for one machine")
    hosts: dict[str, tuple[int, int]] = {}  # host -> (slots, line number)
    problems = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}): is this the hostfile?") from None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(line)
        if not match:
            problems.append(f"{path}:{number}: {line!r}: {EXPECTED_LINE}")
            continue
        host, slots = match["host"], int(match["slots"])
        if not valid_host(host):
            # The launcher hands host names to ssh and pdsh: `-oProxyCommand=...` would be an option, not a host.
            problems.append(f"{path}:{number}: {host!r} is not a host name or IP address (letters, digits, '-' and '.',"
                            " not starting with '-')")
        elif slots < 1:
            problems.append(f"{path}:{number}: {host} has slots=0: give it at least one slot or remove the line")
        elif host in hosts:  # the launcher refuses duplicates
            problems.append(f"{path}:{number}: {host} is already listed on line {hosts[host][1]}: keep one line per host")
        else:
            hosts[host] = (slots, number)
    if not problems and not hosts:
        problems.append(f"{path}: no hosts: {EXPECTED_LINE}")
    if problems:
        raise UserError("\n".join(problems))
    return [(host, slots) for host, (slots, _) in hosts.items()]



def launcher_command(train: TrainConfig, script: str, args: list[str], module: bool = False) -> list[str]:
    """The `deepspeed` launcher command line that runs script (or, with module, `python -m script`) on every node
    and process of train.*."""
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [exe]
    if train.hostfile:
        if not Path(train.hostfile).is_file():
            raise UserError(f"train.hostfile: {train.hostfile} not found")
        try:
            parse_hostfile(train.hostfile)
        except UserError as e:
            raise UserError(f"train.hostfile: {e}") from None
        cmd += ["--hostfile", train.hostfile]
    if train.num_nodes:
        cmd += ["--num_nodes", str(train.num_nodes)]
    if train.num_gpus:
        cmd += ["--num_gpus", str(train.num_gpus)]
    if train.include:
        cmd += ["--include", train.include]
    if train.exclude:
        cmd += ["--exclude", train.exclude]
    cmd += ["--master_port", str(train.master_port), *train.launcher_args]
    # A module's command line is ours (`pipeline.cli train ...`): the launcher must not put --local_rank before it.
    cmd += ["--no_local_rank", "--module", script] if module else [script]
    return cmd + args


def relaunch(train: TrainConfig, params_file: str | Path, overrides: list[str], echo: Echo = silent) -> int:
    """Run the train stage again under the deepspeed launcher (train.launcher=deepspeed); its exit code.

    Every node runs the same command in the same directory, so it must exist there on each: stages/train.py in
    this repository (its checkout on every node), else the installed package as a module (a `gptpipe init` project,
    gptpipe installed on every node).
    """
    script = Path.cwd() / "stages" / "train.py"
    args = ["--params", str(Path(params_file).resolve()), *[f"--set={s}" for s in overrides]]
    if script.is_file():
        cmd = launcher_command(train, str(script), args)
    else:  # an installed gptpipe (a project made by `gptpipe init`): LOCAL_RANK comes from the environment
        cmd = launcher_command(train, "pipeline.cli", ["train", *args], module=True)
    echo(f"train: launching {' '.join(cmd)}")
    return subprocess.call(cmd)


def checkpoint_weights(folder: Path, tag: str, zero_stage: int) -> dict:
    """A saved checkpoint's full model weights, read from disk without an engine (ZeRO-3: consolidated).

    Loaded safely even though the files were verified first: a file swapped after that check still runs no code.
    """
    with safe_unpickling():
        if zero_stage == 3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        return torch.load(folder / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
