"""Elastic resume: a checkpoint saved by another number of processes, converted once to DeepSpeed's universal
format (kept beside the run, checksummed, tied to the step it came from) and loaded from there."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.checkpoints.deepspeed_io import check_loadable, deepspeed_to_universal, partitioned_optimizer
from pipeline.checkpoints.state import TrainState
from pipeline.errors import UserError
from pipeline.files import seal, seal_problem, sha256, write_failure, write_json_atomic, write_text_atomic
from pipeline.infra.distributed import Dist, barrier
from pipeline.layout import CheckpointDir, RunDir
from pipeline.output import Echo, silent

SOURCE = "source.json"  # in a conversion: the step it came from, by the sha256 of that step's checksums.json
# Measured here (CPU, tiny to 1.3M-parameter GPT-2): a conversion takes 1-3 s, most of it fixed cost; DeepSpeed's
# converter then reads and writes each parameter's fp32 weights and moments once. A live but slow rank 0 is given
# this many seconds per GB of checkpoint on top of twice train.collective_timeout before the others give up.
SECONDS_PER_GB = 600
HEARTBEAT_S = 1.0


def saved_world_size(run: RunDir, tag: str) -> int | None:
    return TrainState.read(run.step(tag).state).world_size


def prepare_elastic_resume(run: RunDir, tag: str, dist: Dist, echo: Echo = silent, timeout_s: int = 600,
                           optimizer: str = "adamw") -> Path | None:
    """When checkpoint `tag` was saved by another number of processes: the universal checkpoint to load instead
    (converted once by rank 0, kept under run/universal/ for the next resume), or None when it loads as it is.

    Ranks other than 0 wait for the conversion on the file system, not in a collective (it may take longer than
    train.collective_timeout for a large model), while rank 0 shows it is alive; a rank 0 that stops showing it
    for timeout_s seconds, or takes far longer than the checkpoint's size explains, ends the wait with a message.
    """
    saved = saved_world_size(run, tag)
    if saved is None or saved == dist.world_size:
        return None
    source = run.step(tag)
    if not partitioned_optimizer(source.root):
        echo(f"train: {tag} was saved by {saved} processes, this run has {dist.world_size}; its optimizer state is whole,"
             " so it loads as it is")
        return None
    if optimizer == "muon":
        # ds_to_universal (DeepSpeed 0.19.8) converts Adam's moments only: it stops at Muon's momentum (KeyError 'exp_avg').
        raise UserError(f"train: {tag} was saved by {saved} processes and this run has {dist.world_size}: with train.optimizer=muon"
                        f" and ZeRO a checkpoint resumes on the number of processes that saved it only (DeepSpeed cannot convert"
                        f" Muon's optimizer state to its universal format). Resume on {saved} processes, or use train.zero_stage=0,"
                        f" whose optimizer state is whole, or start over with train.resume=never")
    out = run.universal(tag)
    failed, alive = out.with_name(f".{tag}.failed"), out.with_name(f".{tag}.alive")
    stamp = source_stamp(source)
    reuse = False
    if dist.is_main:
        failed.unlink(missing_ok=True)  # of an earlier attempt: gone before any rank looks
        alive.unlink(missing_ok=True)
        problem = universal_problem(out, stamp) if out.exists() else "absent"
        reuse = problem is None
        if not reuse and problem != "absent":
            echo(f"train: the universal checkpoint {out} cannot be used ({problem}): converting {tag} again")
            shutil.rmtree(out, ignore_errors=True)  # decided before the others look, so they never take it for done
    barrier()
    said = f"train: {tag} was saved by {saved} processes, this run has {dist.world_size}"
    if dist.is_main:
        if reuse:
            echo(f"{said}: loading its universal checkpoint {out} (converted before)")
        else:
            try:
                start = time.perf_counter()
                with heartbeat(alive):
                    convert_universal(source, out, stamp)
                echo(f"{said}: converted it to a universal checkpoint in {out} ({time.perf_counter() - start:.1f} s;"
                     " kept for the next resume)")
            except UserError as e:
                write_text_atomic(failed, str(e))
                raise
    else:
        wait_for_conversion(out, stamp, failed, alive, timeout_s, checkpoint_gb(source))
    barrier()
    return out


def source_stamp(source: CheckpointDir) -> dict:
    """What ties a conversion to the step it came from: that step's checksum list, which covers every file of it."""
    return {"step": source.tag, "checksums_sha256": sha256(source.checksums)}


def checkpoint_gb(source: CheckpointDir) -> float:
    return sum(p.stat().st_size for p in source.root.rglob("*") if p.is_file()) / 1e9


def convert_universal(source: CheckpointDir, out: Path, stamp: dict) -> None:
    """source -> out in DeepSpeed's universal format, built beside out and moved into place with its checksums."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # damaged or stale: convert again
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        deepspeed_to_universal(source.root, tmp)
        (tmp.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer to tmp: gptpipe keeps its own
        write_json_atomic(tmp / SOURCE, stamp)
        seal(tmp, tmp / "checksums.json")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(e, out) or e from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out)


def universal_problem(out: Path, stamp: dict) -> str | None:
    """Why a conversion must not be loaded, naming the file; None when it is complete, of this very step, intact
    (every file has the sha256 it lists, no torch file is unlisted) and safe (each torch file loads without code)."""
    listing = out / "checksums.json"
    if not listing.is_file():
        return "incomplete (no checksums.json)"
    if not converted_from(out, stamp):
        return f"it was converted from an earlier {stamp['step']}, which has been saved again since"
    problem = seal_problem(out, listing)
    if problem:
        return problem
    for path in sorted(out.rglob("*.pt")):  # each one listed: seal_problem says so
        problem = check_loadable(path)
        if problem:
            return f"{path.relative_to(out)}: {problem}"
    return None


def converted_from(out: Path, stamp: dict) -> bool:
    try:
        return json.loads((out / SOURCE).read_text()) == stamp
    except (OSError, ValueError, UnicodeDecodeError):
        return False


@contextmanager
def heartbeat(alive: Path, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """While the block runs, alive's time stamp moves every every_s seconds (a thread): the other ranks read it as
    "rank 0 is still converting". A stopped or killed process stops it, so they can tell frozen from slow."""
    alive.parent.mkdir(parents=True, exist_ok=True)
    alive.write_text(f"{os.getpid()}\n")
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            try:
                os.utime(alive)
            except OSError:
                return

    thread = threading.Thread(target=beat, name="gptpipe-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        alive.unlink(missing_ok=True)


def wait_for_conversion(out: Path, stamp: dict, failed: Path, alive: Path, timeout_s: float, size_gb: float,
                        poll_s: float = 0.5) -> None:
    """Wait until rank 0's conversion of this step is in place; a UserError when it failed, when rank 0 shows no
    sign of life for timeout_s seconds, or when it runs far past what the checkpoint's size explains."""
    start = time.monotonic()
    limit = 2 * timeout_s + SECONDS_PER_GB * size_gb
    while not ((out / "checksums.json").is_file() and converted_from(out, stamp)):
        if failed.is_file():
            raise UserError(failed.read_text())
        waited = time.monotonic() - start
        try:
            quiet = time.time() - alive.stat().st_mtime
        except FileNotFoundError:
            quiet = waited  # not started yet (or finished, then the conversion is there at the next look)
        what = f"rank 0 converting {stamp['step']} ({size_gb:.2g} GB) to a universal checkpoint in {out}"
        if quiet > timeout_s:
            raise UserError(f"train: {what} showed no sign of life for {quiet:.0f} s (train.collective_timeout={timeout_s:g}):"
                            " it is frozen (stopped, or stuck in I/O) or ended; see its log. Nothing was loaded; a rerun"
                            " converts again")
        if waited > limit:
            raise UserError(f"train: {what} has not finished after {waited:.0f} s, though a conversion takes time in"
                            f" proportion to the checkpoint's size (allowed: twice train.collective_timeout + {SECONDS_PER_GB} s"
                            " per GB); raise train.collective_timeout if rank 0 is busy but slow (a slow disk)")
        time.sleep(poll_s)
