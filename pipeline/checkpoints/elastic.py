"""Elastic resume: a checkpoint saved by another number of processes, converted once to DeepSpeed's universal
format (kept beside the run, checksummed) and loaded from there."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from pipeline.checkpoints.deepspeed_io import deepspeed_to_universal, partitioned_optimizer
from pipeline.checkpoints.folder import sha256
from pipeline.checkpoints.state import TrainState
from pipeline.errors import UserError
from pipeline.files import write_failure, write_json_atomic, write_text_atomic
from pipeline.infra.distributed import Dist, barrier
from pipeline.layout import RunDir
from pipeline.output import Echo, silent


def saved_world_size(run: RunDir, tag: str) -> int | None:
    return TrainState.read(run.step(tag).state).world_size


def prepare_elastic_resume(run: RunDir, tag: str, dist: Dist, echo: Echo = silent) -> Path | None:
    """When checkpoint `tag` was saved by another number of processes: the universal checkpoint to load instead
    (converted once by rank 0, kept under run/universal/ for the next resume), or None when it loads as it is.

    Ranks other than 0 wait for the conversion on the file system, not in a collective: it may take longer than
    train.collective_timeout for a large model.
    """
    saved = saved_world_size(run, tag)
    if saved is None or saved == dist.world_size:
        return None
    source = run.step(tag).root
    if not partitioned_optimizer(source):
        echo(f"train: {tag} was saved by {saved} processes, this run has {dist.world_size}; its optimizer state is whole,"
             " so it loads as it is")
        return None
    out, failed = run.universal(tag), run.universal(tag).with_suffix(".failed")
    if dist.is_main:
        failed.unlink(missing_ok=True)  # of an earlier attempt: gone before any rank looks
    barrier()
    if dist.is_main:
        try:
            if universal_intact(out):
                echo(f"train: {tag} was saved by {saved} processes, this run has {dist.world_size}: loading its universal"
                     f" checkpoint {out} (converted before)")
            else:
                start = time.perf_counter()
                convert_universal(source, out)
                echo(f"train: {tag} was saved by {saved} processes, this run has {dist.world_size}: converted it to a universal"
                     f" checkpoint in {out} ({time.perf_counter() - start:.1f} s; kept for the next resume)")
        except UserError as e:
            write_text_atomic(failed, str(e))
            raise
    else:
        while not universal_intact(out, quick=True):
            if failed.is_file():
                raise UserError(failed.read_text())
            time.sleep(0.5)
    barrier()
    return out


def convert_universal(source: Path, out: Path) -> None:
    """source -> out in DeepSpeed's universal format, built beside out and moved into place with its checksums."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # damaged: convert again
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        deepspeed_to_universal(source, tmp)
        (tmp.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer to tmp: gptpipe keeps its own
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        write_json_atomic(tmp / "checksums.json", {str(p.relative_to(tmp)): sha256(p) for p in files})
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(e, out) or e from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out)


def universal_intact(out: Path, quick: bool = False) -> bool:
    """A complete conversion whose files match their checksums (quick: only that it is complete)."""
    listing = out / "checksums.json"
    if not listing.is_file():
        return False
    if quick:
        return True
    try:
        listed = json.loads(listing.read_text())
    except ValueError:
        return False
    return all((out / name).is_file() and sha256(out / name) == digest for name, digest in listed.items())
