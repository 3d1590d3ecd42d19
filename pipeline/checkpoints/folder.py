"""A step folder: saved on every rank and completed by rank 0 (checksums last), verified before any use, loaded
back with each rank's RNG state, pruned to what train.keep_last keeps."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoints.deepspeed_io import check_loadable, load_engine, missing_parameters, read_zero_weights, save_engine
from pipeline.checkpoints.state import TrainState
from pipeline.errors import UserError
from pipeline.files import absent, seal, seal_problem, sha256, write_failure, write_json_atomic, write_text_atomic
from pipeline.infra.distributed import Dist, any_rank, barrier
from pipeline.layout import CheckpointDir, RunDir, TrainMetrics, step_tag
from pipeline.tokenize.tokenizers import Tokenizer


def verify_checkpoint(ckpt: CheckpointDir) -> str | None:
    """Why ckpt must not be used, naming the file; None when it is complete, intact and safe to load.

    Complete: checksums.json (written last) is there. Intact: every file has the sha256 it lists, and no torch
    file the list does not know. Safe: every torch file loads without running code. Consistent: state.json
    is the step its folder name says.
    """
    if not ckpt.checksums.is_file():
        return "incomplete (no checksums.json: the save was interrupted)"
    problem = seal_problem(ckpt.root, ckpt.checksums)
    if problem:
        return problem
    try:
        state = TrainState.read(ckpt.state)
    except (ValueError, TypeError, OSError):
        return f"{ckpt.state.name} is unreadable"
    if state.tag != ckpt.tag or state.step != int(ckpt.tag.removeprefix("step-")):
        return f"{ckpt.state.name} describes {state.tag} (step {state.step}), not this folder"
    for path in sorted(ckpt.root.rglob("*.pt")):  # each one listed: seal_problem says so
        problem = check_loadable(path)
        if problem:
            return f"{path.relative_to(ckpt.root)}: {problem}"
    return None


def latest_tag(run: RunDir) -> str | None:
    """What `latest` names when that checkpoint is complete (for messages; resume uses choose_resume)."""
    if not run.latest.is_file():
        return None
    tag = run.latest.read_text().strip()
    return tag if run.step(tag).checksums.is_file() else None


def save_checkpoint(engine, run: RunDir, state: TrainState, dist: Dist, keep_last: int, tokenizer: Tokenizer,
                    metrics: TrainMetrics) -> str:
    """Save on every rank; rank 0 then completes the folder, moves `latest` (and `best`) and prunes old ones.

    A write that fails (a full disk) on any rank removes the incomplete folder and ends the run on every rank
    with one message; the checkpoints before it stay intact.
    """
    tag = step_tag(state.step)
    ckpt = run.step(tag)
    if dist.is_main:
        if ckpt.root.exists():
            shutil.rmtree(ckpt.root)  # a leftover of a crash, or a damaged copy: never mix its files with new ones
        shutil.rmtree(run.universal(tag), ignore_errors=True)  # converted from an earlier step of this number
    barrier()
    failure = _attempt(lambda: _write_shards(engine, run, ckpt, dist), ckpt.root)
    if not any_rank(failure is not None, dist.device) and dist.is_main:
        failure = _attempt(lambda: _complete(engine, run, ckpt, state, tokenizer, metrics, keep_last), ckpt.root)
    if any_rank(failure is not None, dist.device):
        if dist.is_main:
            shutil.rmtree(ckpt.root, ignore_errors=True)
        before = latest_tag(run)
        resume = f"a rerun resumes from {run.root / before}" if before else "no earlier checkpoint exists"
        raise UserError(f"train: {failure or 'another process failed to write its part'} while saving {ckpt.root};"
                        f" the incomplete checkpoint was removed and {resume}")
    return tag


def _write_shards(engine, run: RunDir, ckpt: CheckpointDir, dist: Dist) -> None:
    save_engine(engine, run.root, ckpt.tag)
    torch.save(capture_rng(), ckpt.rng(dist.rank))


def _complete(engine, run: RunDir, ckpt: CheckpointDir, state: TrainState, tokenizer: Tokenizer, metrics: TrainMetrics,
              keep_last: int) -> None:
    """Rank 0, after every rank saved: what makes the folder stand alone, the checksums last, then the pointers."""
    engine.module.config.to_json_file(ckpt.model_config)  # the model rebuilds from it for inference
    tokenizer.save(ckpt.tokenizer)
    copy_metrics(metrics, TrainMetrics(ckpt.metrics))
    state.write(ckpt.state)
    seal(ckpt.root, ckpt.checksums)
    write_text_atomic(run.latest, ckpt.tag)
    if state.best_tag == ckpt.tag:
        write_text_atomic(run.best, ckpt.tag)
    prune_checkpoints(run, keep_last)


def _attempt(write, path: Path) -> UserError | None:
    """Run write(); a failure the user fixes (a full disk, permissions) comes back as a message, a bug raises."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 - narrowed by write_failure: anything else re-raises unchanged
        failure = write_failure(e, path)
        if failure is None:
            raise
        return failure
    return None


def prune_checkpoints(run: RunDir, keep_last: int) -> None:
    """Keep the newest keep_last complete checkpoints, the best and the one `latest` names; remove the rest."""
    best = run.best.read_text().strip() if run.best.is_file() else None
    latest = run.latest.read_text().strip() if run.latest.is_file() else None
    steps = run.steps()
    complete = [c.tag for c in steps if c.checksums.is_file()]
    keep = set(complete[-keep_last:]) | {best, latest}
    for ckpt in steps:
        # Incomplete folders older than `latest` are leftovers of a crash mid-save.
        if ckpt.tag not in keep and (ckpt.tag in complete or (latest and ckpt.tag < latest)):
            shutil.rmtree(ckpt.root, ignore_errors=True)
    for converted in (run.root / "universal").glob("step-*"):
        if converted.name not in keep:  # the step it was converted from is gone
            shutil.rmtree(converted, ignore_errors=True)


def load_checkpoint(engine, run: RunDir, tag: str, dist: Dist, universal: Path | None = None) -> TrainState:
    """Load weights, optimizer and this rank's RNG state (checked by verify first); return the saved training state.

    universal: the step converted for another world size (prepare_elastic_resume); a rank the saving run did not
    have starts a generator of its own, seeded by the step and its rank.
    """
    ckpt = run.step(tag)
    if universal is not None:
        missing = missing_parameters(universal, engine.module)
        if missing:
            raise UserError(f"train: the universal checkpoint {universal} lacks what this model needs:"
                            f" {missing}. Nothing was loaded; delete {universal} and rerun to convert {tag} again")
        load_engine(engine, universal.parent, universal.name, universal=True)
    else:
        load_engine(engine, run.root, tag)
    state = TrainState.read(ckpt.state)
    if ckpt.rng(dist.rank).is_file():
        restore_rng(torch.load(ckpt.rng(dist.rank), weights_only=True))
    else:
        seed_rng(1_000_003 * state.step + dist.rank)
    return state


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def copy_metrics(src: TrainMetrics, dst: TrainMetrics) -> None:
    """The training curves and summary so far: saved with a checkpoint, put back when a run resumes from it,
    so the curves continue exactly from the resumed step (no rows of steps trained again, none of another run)."""
    for path in (dst.curves, dst.summary, dst.samples):
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
    dst.root.mkdir(parents=True, exist_ok=True)
    # Contents only, not modes: a checkpoint that DVC links into its cache is read-only, and the copy is appended to.
    if src.curves.is_dir():
        shutil.copytree(src.curves, dst.curves, copy_function=shutil.copyfile)
    if src.summary.is_file():
        shutil.copyfile(src.summary, dst.summary)
    # A checkpoint of a gptpipe before samples had a folder of their own holds them beside metrics.json.
    samples = src.samples if src.samples.is_file() else src.root / src.samples.name
    if samples.is_file():
        dst.samples.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(samples, dst.samples)


def capture_rng() -> dict:
    """Every generator's state as tensors and numbers only, so the file loads with weights_only=True."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_weights(ckpt: CheckpointDir) -> dict:
    """The full model weights of a checkpoint, consolidated from its ZeRO partitions when there are several."""
    return read_zero_weights(ckpt.root.parent, ckpt.tag, TrainState.read(ckpt.state).zero_stage)
