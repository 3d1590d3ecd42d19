"""DeepSpeed's part of a checkpoint: its save and load of the engine, conversion to the universal format, and
the weights read back from disk without an engine; nothing is unpickled beyond tensors and plain values."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.infra.deepspeed_fixes import universal_load, weights_only_loads


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
    with weights_only_loads():
        try:
            with redirect_stdout(log), redirect_stderr(log):
                ds_to_universal.main(args)
        except Exception as e:  # noqa: BLE001 - DeepSpeed's converter fails in many ways; each ends in this one message
            tail = "; ".join(log.getvalue().strip().splitlines()[-3:])
            raise UserError(f"train: converting {checkpoint} to a universal checkpoint failed ({type(e).__name__}: {e}; {tail})") from None


def load_engine(engine, folder: Path, tag: str, universal: bool = False) -> None:
    """Weights and optimizer state from folder/tag; universal: a checkpoint in DeepSpeed's universal format (set for
    this load only, and DeepSpeed's universal loader corrected: universal_load)."""
    with universal_load(engine, universal), weights_only_loads():
        path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
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


def check_loadable(path: Path) -> str | None:
    """Why torch must not or cannot load path (code in its pickle, a broken archive), or None when it loads safely.

    Memory-maps the tensors, so only the pickled structure is read: cheap even for a large file.
    """
    try:
        with weights_only_loads():
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
    with weights_only_loads():
        if zero_stage == 3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        return torch.load(folder / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
