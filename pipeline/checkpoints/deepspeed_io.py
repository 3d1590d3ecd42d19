"""DeepSpeed's part of a checkpoint: its save and load of the engine, conversion to the universal format, and
the weights read back from disk without an engine; nothing is unpickled beyond tensors and plain values."""

from __future__ import annotations

import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from pipeline.errors import UserError


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


def deepspeed_to_universal(checkpoint: Path, out: Path) -> None:
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


def missing_parameters(universal: Path, module) -> str | None:
    """What a conversion lacks for this model, naming the file; None when every trainable parameter has its fp32
    weights and the optimizer state the others have. A checksum list edited to match a deleted file passes every
    checksum: only the model knows what must be there."""
    zero = universal / "zero"
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    present = {name: {f.name for f in (zero / name).glob("*.pt")} for name in names}
    state_files = set().union(*present.values()) if present else set()
    for name in names:
        for file in sorted(state_files | {"fp32.pt"}):
            if file not in present[name]:
                return f"zero/{name}/{file} is missing"
    if not any(universal.glob("*model_states.pt")):  # mp_rank_00_..., or one per saving rank under ZeRO-3
        return "its model states file (*model_states.pt) is missing"
    if not (universal / "zero" / "optimizer_state.pt").is_file():
        return "zero/optimizer_state.pt is missing"
    return None


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


def read_zero_weights(folder: Path, tag: str, zero_stage: int) -> dict:
    """A saved checkpoint's full model weights, read from disk without an engine (ZeRO-3: consolidated).

    Loaded safely even though the files were verified first: a file swapped after that check still runs no code.
    """
    with safe_unpickling():
        if zero_stage == 3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        return torch.load(folder / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
