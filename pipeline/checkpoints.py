"""The run folder and its checkpoints: they describe themselves, become `latest` only when complete, resume exactly.

Layout (file names in layout.py): <train.out_dir>/run-<id>/ holds one run, where <id> hashes everything that
must match to resume (model, data, optimizer settings, world size). A change of, say, train.lr gives a new
run folder, so the earlier run's checkpoints stay on disk and switching back resumes it.

    run-<id>/run.json         what the id hashes, readable
    run-<id>/ds_config.json   the DeepSpeed config that ran
    run-<id>/step-000100/     DeepSpeed's files, rng-rank<r>.pt per rank, config.json (the model's), tokenizer/,
                              metrics/ (the training curves so far), state.json (written last: step, data
                              position, best so far, the resolved params)
    run-<id>/latest, best     the tag of the newest complete checkpoint and of the best by val loss

A step folder stands alone: it loads for inference from any working directory, whatever happened to the
tokenize stage's output since.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline import engine as ds
from pipeline.config import Params
from pipeline.engine import Dist
from pipeline.errors import UserError
from pipeline.files import write_json_atomic, write_text_atomic
from pipeline.layout import CheckpointDir, RunDir, TrainMetrics, step_tag
from pipeline.tokenizers import Tokenizer

# Changing these keeps the run: they say how long to train and how often to log, not what to learn.
RESUME_SAFE = {
    "max_steps", "log_interval", "eval_interval", "eval_batches", "save_interval", "keep_last", "peak_tflops",
    "launcher", "hostfile", "num_gpus", "num_nodes", "master_port", "launcher_args", "out_dir", "export_dir", "metrics_dir",
}  # fmt: skip


def run_identity(p: Params, data: dict, world_size: int, grad_accum: int) -> dict:
    """Everything a checkpoint must agree with to be resumed, as flat dotted keys; data fingerprints the tokens."""
    identity = {f"model.{k}": v for k, v in p.model.model_dump().items()}
    identity.update({f"train.{k}": v for k, v in p.train.model_dump().items() if k not in RESUME_SAFE})
    identity.update({f"data.{k}": v for k, v in data.items()})
    identity["world_size"] = world_size
    identity["grad_accum"] = grad_accum
    return identity


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_folder(out_dir: str | Path, identity: dict) -> RunDir:
    return RunDir(Path(out_dir) / f"run-{_hash(identity)}")


def why_fresh(out_dir: str | Path, identity: dict) -> str | None:
    """When other runs exist in out_dir, what differs from the newest: the reason this one starts fresh."""
    mine = run_folder(out_dir, identity)
    others = sorted(Path(out_dir).glob("run-*/run.json"), key=lambda f: f.stat().st_mtime)
    others = [f for f in others if RunDir(f.parent) != mine]
    if not others:
        return None
    previous = json.loads(others[-1].read_text())
    changed = [f"{k} {previous.get(k)!r} -> {identity.get(k)!r}" for k in sorted(set(previous) | set(identity)) if previous.get(k) != identity.get(k)]
    return f"{', '.join(changed)} since {others[-1].parent} (kept there)"


def start_run(run: RunDir, identity: dict, ds_config: dict, dist: Dist) -> None:
    """Create the run folder (rank 0) with what identifies it and the DeepSpeed config that runs."""
    if dist.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.identity, identity)
        write_json_atomic(run.ds_config, ds_config)


def latest_tag(run: RunDir) -> str | None:
    """The newest complete checkpoint: `latest` is written only after every rank has saved."""
    if not run.latest.is_file():
        return None
    tag = run.latest.read_text().strip()
    return tag if run.step(tag).state.is_file() else None


def save(engine, run: RunDir, step: int, state: dict, dist: Dist, keep_last: int, tokenizer: Tokenizer,
         metrics: TrainMetrics) -> str:
    """Save on every rank; rank 0 then completes the folder, moves `latest` (and `best`) and prunes old ones."""
    tag = step_tag(step)
    ckpt = run.step(tag)
    ds.save_engine(engine, run.root, tag)
    torch.save(capture_rng(), ckpt.rng(dist.rank))
    ds.barrier()
    if dist.is_main:
        # What lets the folder load for inference on its own: the model's config and the tokenizer.
        engine.module.config.to_json_file(ckpt.model_config)
        if ckpt.tokenizer.exists():
            shutil.rmtree(ckpt.tokenizer)
        tokenizer.save(ckpt.tokenizer)
        copy_metrics(metrics, TrainMetrics(ckpt.metrics))
        write_json_atomic(ckpt.state, {**state, "tag": tag})
        write_text_atomic(run.latest, tag)
        if state.get("best_tag") == tag:
            write_text_atomic(run.best, tag)
        prune(run, keep_last)
    ds.barrier()
    return tag


def prune(run: RunDir, keep_last: int) -> None:
    """Keep the newest keep_last complete checkpoints and the best; remove the rest."""
    best = run.best.read_text().strip() if run.best.is_file() else None
    steps = run.steps()
    complete = [c.tag for c in steps if c.state.is_file()]
    keep = set(complete[-keep_last:]) | {best}
    latest = latest_tag(run)
    for ckpt in steps:
        # Incomplete folders older than `latest` are leftovers of a crash mid-save.
        if ckpt.tag not in keep and (ckpt.tag in complete or (latest and ckpt.tag < latest)):
            shutil.rmtree(ckpt.root, ignore_errors=True)


def load(engine, run: RunDir, tag: str, dist: Dist) -> dict:
    """Load weights, optimizer and this rank's RNG state; return the saved training state."""
    ckpt = run.step(tag)
    ds.load_engine(engine, run.root, tag)
    if ckpt.rng(dist.rank).is_file():
        restore_rng(torch.load(ckpt.rng(dist.rank), weights_only=False))
    return json.loads(ckpt.state.read_text())


def copy_metrics(src: TrainMetrics, dst: TrainMetrics) -> None:
    """The training curves and summary so far: saved with a checkpoint, put back when a run resumes from it,
    so the curves continue exactly from the resumed step (no rows of steps trained again, none of another run)."""
    for path in (dst.curves, dst.summary):
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
    dst.root.mkdir(parents=True, exist_ok=True)
    if src.curves.is_dir():
        shutil.copytree(src.curves, dst.curves)
    if src.summary.is_file():
        shutil.copy2(src.summary, dst.summary)


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------ for inference


def find_checkpoint(folder: str | Path) -> CheckpointDir | None:
    """The checkpoint a folder names: a step folder itself, or a run folder's latest; None if neither."""
    folder = Path(folder)
    if CheckpointDir(folder).state.is_file():
        return CheckpointDir(folder)
    if RunDir(folder).latest.is_file():
        tag = latest_tag(RunDir(folder))
        if tag is None:
            raise UserError(f"{folder}: a run folder whose `latest` names no complete checkpoint")
        return RunDir(folder).step(tag)
    return None


def checkpoint_weights(ckpt: CheckpointDir) -> dict:
    """The full model weights of a checkpoint, consolidated from its ZeRO partitions when there are several."""
    state = json.loads(ckpt.state.read_text())
    zero_stage = state["params"]["train"]["zero_stage"]
    return ds.checkpoint_weights(ckpt.root.parent, ckpt.tag, zero_stage)
