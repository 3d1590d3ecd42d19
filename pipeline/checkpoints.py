"""Checkpoints that describe themselves, become `latest` only when complete, and resume exactly.

Layout: <train.out_dir>/run-<id>/ holds one run, where <id> hashes everything that must match to resume
(model, data, optimizer settings, world size). A change of, say, train.lr gives a new run folder, so
the earlier run's checkpoints stay on disk and switching back resumes it.

    run-<id>/run.json         what the id hashes, readable
    run-<id>/ds_config.json   the DeepSpeed config that ran
    run-<id>/step-000100/     DeepSpeed's files, rng-rank<r>.pt per rank, state.json (written last)
    run-<id>/latest, best     the tag of the newest complete checkpoint and of the best by val loss
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
from pipeline.files import write_json_atomic, write_text_atomic

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


def run_folder(out_dir: str | Path, identity: dict) -> Path:
    return Path(out_dir) / f"run-{_hash(identity)}"


def why_fresh(out_dir: str | Path, identity: dict) -> str | None:
    """When other runs exist in out_dir, what differs from the newest: the reason this one starts fresh."""
    others = sorted(Path(out_dir).glob("run-*/run.json"), key=lambda f: f.stat().st_mtime)
    others = [f for f in others if f.parent != run_folder(out_dir, identity)]
    if not others:
        return None
    previous = json.loads(others[-1].read_text())
    changed = [f"{k} {previous.get(k)!r} -> {identity.get(k)!r}" for k in sorted(set(previous) | set(identity)) if previous.get(k) != identity.get(k)]
    return f"{', '.join(changed)} since {others[-1].parent} (kept there)"


def latest_tag(run_dir: Path) -> str | None:
    """The newest complete checkpoint: `latest` is written only after every rank has saved."""
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (run_dir / tag / "state.json").is_file() else None


def save(engine, run_dir: Path, step: int, state: dict, dist: Dist, keep_last: int) -> str:
    """Save on every rank; rank 0 then marks it complete, moves `latest` (and `best`) and prunes old ones."""
    tag = f"step-{step:06d}"
    ds.save_engine(engine, run_dir, tag)
    torch.save(capture_rng(), run_dir / tag / f"rng-rank{dist.rank}.pt")
    ds.barrier()
    if dist.is_main:
        write_json_atomic(run_dir / tag / "state.json", {**state, "tag": tag})
        write_text_atomic(run_dir / "latest", tag)
        if state.get("best_tag") == tag:
            write_text_atomic(run_dir / "best", tag)
        prune(run_dir, keep_last)
    ds.barrier()
    return tag


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest keep_last complete checkpoints and the best; remove the rest."""
    best = (run_dir / "best").read_text().strip() if (run_dir / "best").is_file() else None
    tags = sorted(d.name for d in run_dir.glob("step-*") if d.is_dir())
    complete = [t for t in tags if (run_dir / t / "state.json").is_file()]
    keep = set(complete[-keep_last:]) | {best}
    latest = latest_tag(run_dir)
    for tag in tags:
        # Incomplete folders older than `latest` are leftovers of a crash mid-save.
        if tag not in keep and (tag in complete or (latest and tag < latest)):
            shutil.rmtree(run_dir / tag, ignore_errors=True)


def load(engine, run_dir: Path, tag: str, dist: Dist) -> dict:
    """Load weights, optimizer and this rank's RNG state; return the saved training state."""
    ds.load_engine(engine, run_dir, tag)
    rng = run_dir / tag / f"rng-rank{dist.rank}.pt"
    if rng.is_file():
        restore_rng(torch.load(rng, weights_only=False))
    return json.loads((run_dir / tag / "state.json").read_text())


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


def load_for_inference(folder: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a checkpoint folder (run-*/step-*) or a run folder (its latest checkpoint)."""
    from pipeline.data import read_meta
    from pipeline.errors import UserError
    from pipeline.models import build_model
    from pipeline.tokenizers import load_tokenizer

    folder = Path(folder)
    if not (folder / "state.json").is_file():
        tag = latest_tag(folder)
        if tag is None:
            raise UserError(f"{folder}: not a complete checkpoint (no state.json) nor a run folder with one")
        folder = folder / tag
    state = json.loads((folder / "state.json").read_text())
    p = Params.model_validate(state["params"])
    tokens_dir = Path(p.tokenize.out_dir)
    meta = read_meta(tokens_dir)  # the checkpoint names its tokenizer by the tokenize stage's output folder
    model = build_model(p.model, meta["vocab_size"], meta["eot_id"], dtype=dtype)
    model.load_state_dict(ds.checkpoint_weights(folder.parent, folder.name))
    return model.eval(), load_tokenizer(tokens_dir / "tokenizer")
