"""The run folder and its checkpoints: they describe themselves, become `latest` only when complete, resume exactly.

Layout (file names in layout.py): <train.out_dir>/run-<id>/ holds one run, where <id> hashes everything that
must match to resume (model, data, optimizer settings, the global batch). A change of, say, train.lr gives a new
run folder, so the earlier run's checkpoints stay on disk and switching back resumes it. The number of processes
is not part of it: a checkpoint saved by N processes resumes on M, converted once to DeepSpeed's universal format
when its optimizer state is partitioned (run-<id>/universal/step-*, kept for the next resume).

    run-<id>/run.json         what the id hashes, readable
    run-<id>/ds_config.json   the DeepSpeed config that ran
    run-<id>/step-000100/     DeepSpeed's files, rng-rank<r>.pt per rank, config.json (the model's), tokenizer/,
                              metrics/ (the training curves so far), state.json (step, data position, best so
                              far, the resolved params), checksums.json (sha256 of every file; written last)
    run-<id>/latest, best     the tag of the newest complete checkpoint and of the best by val loss

A step folder stands alone: it loads for inference from any working directory, whatever happened to the
tokenize stage's output since. Nothing in it is unpickled beyond tensors and plain values, and it is used only
when every file matches its checksum: a damaged checkpoint is skipped (resume) or refused (inference) by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import engine as ds
from pipeline.config import Batch, Params, TrainConfig
from pipeline.engine import Dist
from pipeline.errors import UserError
from pipeline.files import write_failure, write_json_atomic, write_text_atomic
from pipeline.layout import CheckpointDir, RunDir, TrainMetrics, step_tag
from pipeline.output import Echo, silent
from pipeline.tokenizers import Tokenizer

# Changing these keeps the run: they say how long to train, how often to look and where things go, not what to learn.
RESUME_SAFE = {
    "max_steps", "epochs", "decay_steps", "log_interval", "eval_interval", "eval_batches", "eval_at_start",
    "early_stopping_patience", "early_stopping_min_delta", "hellaswag_interval", "hellaswag_limit", "sample_interval",
    "sample_prompts", "sample_max_new_tokens", "save_interval", "keep_last", "run_name", "resume", "export", "export_dtype",
    "loggers", "wandb_project", "peak_tflops", "launcher", "hostfile", "num_gpus", "num_nodes", "include", "exclude",
    "master_port", "launcher_args", "collective_timeout", "compile", "tf32", "out_dir", "export_dir", "metrics_dir",
}  # fmt: skip


# Not part of a run's identity as set: they only split the global batch across processes and micro steps. The
# global batch they add up to is (tokens_per_step), so a run continues on another number of processes when it is kept.
BATCH_SPLIT = {"grad_accum", "global_batch_tokens"}

# Raised when gptpipe changes what it builds from the same params (a model's activation or vocabulary padding)
# or what a run's identity holds, so a checkpoint of an earlier gptpipe is not resumed into a different model.
RUN_FORMAT = 3


def run_identity(p: Params, data: dict, batch: Batch) -> dict:
    """Everything a checkpoint must agree with to be resumed, as flat dotted keys; data fingerprints the tokens.

    The world size is not in it: the same global batch on another number of processes continues the same run.
    """
    identity = {"format": RUN_FORMAT, **{f"model.{k}": v for k, v in p.model.model_dump().items()}}
    identity.update({f"train.{k}": v for k, v in p.train.model_dump().items() if k not in RESUME_SAFE | BATCH_SPLIT})
    identity.update({f"data.{k}": v for k, v in data.items()})
    identity["train.tokens_per_step"] = batch.tokens_per_step
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
    reason = f"{differences(previous, identity)} since {others[-1].parent} (kept there)"
    if {k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k)} == {"train.tokens_per_step"}:
        # Most often another number of processes with a fixed micro batch and accumulation: say how to keep the run.
        reason += (f". To continue that run on this number of processes, keep its global batch:"
                   f" train.global_batch_tokens={previous['train.tokens_per_step']}")
    return reason


def differences(saved: dict, identity: dict) -> str:
    keys = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    return ", ".join(f"{k} {saved.get(k)!r} -> {identity.get(k)!r}" for k in keys)


def open_run(t: TrainConfig, identity: dict, dist: Dist, echo: Echo = silent) -> tuple[RunDir, str | None]:
    """(the run folder, the checkpoint to resume or None), decided on rank 0 and the same on every rank.

    train.resume: auto resumes the newest intact checkpoint; never moves an existing folder aside to
    <folder>.previous and starts over; a checkpoint folder resumes that step (a later branch is moved aside).
    """
    answer = None
    if dist.is_main:
        try:
            run, tag = _open_run(t, identity, echo)
            answer = ("ok", (str(run.root), tag))
        except UserError as e:
            answer = ("error", str(e))
    kind, value = ds.broadcast(answer) if dist.world_size > 1 else answer
    if kind == "error":
        raise UserError(value)
    return RunDir(value[0]), value[1]


def _open_run(t: TrainConfig, identity: dict, echo: Echo) -> tuple[RunDir, str | None]:
    if t.resume not in ("auto", "never"):
        ckpt = find_checkpoint(t.resume, "train.resume")
        if ckpt is None:
            raise UserError(f"train.resume: {t.resume} is not a checkpoint (run-*/step-*) nor a run folder")
        run = RunDir(ckpt.root.parent)
        saved = json.loads(run.identity.read_text()) if run.identity.is_file() else {}
        if saved != identity:
            raise UserError(f"train.resume: {ckpt.root} was trained with other settings ({differences(saved, identity)}); resuming"
                            " needs the same model, data and optimizer settings")
        later = [c for c in run.steps() if c.tag > ckpt.tag]
        if later:
            aside = run.root / f"abandoned-after-{ckpt.tag}"
            n = 1
            while aside.exists():  # train.resume left in params.yaml: each rerun branches off the same step again
                n += 1
                aside = run.root / f"abandoned-after-{ckpt.tag}.{n}"
            aside.mkdir()
            for c in later:
                c.root.rename(aside / c.tag)
            echo(f"train: resuming {ckpt.tag} as asked; the later {', '.join(c.tag for c in later)} moved to {aside}."
                 " Set train.resume back to auto, or every run starts again from this checkpoint")
        return run, ckpt.tag

    run = RunDir(Path(t.out_dir) / t.run_name) if t.run_name else run_folder(t.out_dir, identity)
    if t.resume == "never" and run.root.exists():
        aside = run.root.with_name(run.root.name + ".previous")
        shutil.rmtree(aside, ignore_errors=True)
        run.root.rename(aside)
        echo(f"train: train.resume=never: starting over; the earlier {run.root} is now {aside}")
        return run, None
    if t.run_name and run.identity.is_file():
        saved = json.loads(run.identity.read_text())
        if saved != identity:
            raise UserError(f"train.run_name={t.run_name}: {run.root} holds a run with other settings ({differences(saved, identity)});"
                            " choose another run_name, or set train.resume=never to start it over (the old folder is kept as"
                            f" {run.root.name}.previous)")
    return run, choose_resume(run, echo)


def start_run(run: RunDir, identity: dict, ds_config: dict, dist: Dist) -> None:
    """Create the run folder (rank 0) with what identifies it and the DeepSpeed config that runs; then every rank
    checks it sees the folder, since rank 0 reads every rank's checkpoint files (out_dir must be shared)."""
    if dist.is_main:
        try:
            run.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run.identity, identity)
            write_json_atomic(run.ds_config, ds_config)
        except OSError as e:
            raise write_failure(e, run.root) or e from None
    ds.barrier()
    unseen = not run.identity.is_file()
    if ds.any_rank(unseen, dist.device):
        where = f"rank {dist.rank} on {socket.gethostname()} cannot see {run.identity}" if unseen else "another rank cannot see it"
        raise UserError(f"train.out_dir={run.root.parent} must be on storage every node sees (a shared file system): {where},"
                        " which rank 0 wrote")


# ------------------------------------------------------------------------------------------------ resume


def verify(ckpt: CheckpointDir) -> str | None:
    """Why ckpt must not be used, naming the file; None when it is complete, intact and safe to load.

    Complete: checksums.json (written last) is there. Intact: every file has the sha256 it lists, and no torch
    file the list does not know. Safe: every torch file loads without running code. Consistent: state.json
    is the step its folder name says.
    """
    if not ckpt.checksums.is_file():
        return "incomplete (no checksums.json: the save was interrupted)"
    try:
        listed = json.loads(ckpt.checksums.read_text())
        assert isinstance(listed, dict) and all(isinstance(v, str) for v in listed.values())
    except (ValueError, AssertionError, UnicodeDecodeError):
        return f"{ckpt.checksums.name} is not a checksum list"
    for name, digest in listed.items():
        path = ckpt.root / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():  # only files inside the folder
            return f"{name} is missing"
        if sha256(path) != digest:
            return f"{name} is corrupt (its sha256 differs from {ckpt.checksums.name})"
    unlisted = sorted(str(p.relative_to(ckpt.root)) for p in ckpt.root.rglob("*.pt") if str(p.relative_to(ckpt.root)) not in listed)
    if unlisted:
        return f"{unlisted[0]} is not in {ckpt.checksums.name}"
    try:
        state = json.loads(ckpt.state.read_text())
        if state.get("tag") != ckpt.tag or state.get("step") != int(ckpt.tag.removeprefix("step-")):
            return f"{ckpt.state.name} describes {state.get('tag')} (step {state.get('step')}), not this folder"
    except (ValueError, OSError):
        return f"{ckpt.state.name} is unreadable"
    for name in listed:
        if name.endswith(".pt"):
            problem = ds.check_loadable(ckpt.root / name)
            if problem:
                return f"{name}: {problem}"
    return None


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def choose_resume(run: RunDir, echo: Echo = silent) -> str | None:
    """The newest intact checkpoint of the run, or None when it has none (a fresh start).

    `latest` is a convenience, not the only record: a missing or bad pointer falls back to the newest step
    folder that verifies. A run whose every complete checkpoint is damaged is an error, never overwritten.
    """
    complete = [c for c in reversed(run.steps()) if c.checksums.is_file()]
    damaged = []
    for ckpt in complete:
        problem = verify(ckpt)
        if problem is None:
            pointer = run.latest.read_text().strip() if run.latest.is_file() else None
            for tag, why in damaged:
                echo(f"train: skipping checkpoint {run.root / tag}: {why}")
            if pointer != ckpt.tag:
                echo(f"train: `latest` names {pointer or 'nothing'}; the newest intact checkpoint is {ckpt.tag}")
            return ckpt.tag
        damaged.append((ckpt.tag, problem))
    if damaged:
        listing = "; ".join(f"{tag}: {why}" for tag, why in damaged)
        raise UserError(f"train: every checkpoint in {run.root} is damaged ({listing}). Nothing was overwritten: move the"
                        f" folder away (mv {run.root} {run.root}.damaged) to start this run over, or restore it from a backup")
    return None


def latest_tag(run: RunDir) -> str | None:
    """What `latest` names when that checkpoint is complete (for messages; resume uses choose_resume)."""
    if not run.latest.is_file():
        return None
    tag = run.latest.read_text().strip()
    return tag if run.step(tag).checksums.is_file() else None


# -------------------------------------------------------------------------------------------------- save


def save(engine, run: RunDir, step: int, state: dict, dist: Dist, keep_last: int, tokenizer: Tokenizer,
         metrics: TrainMetrics) -> str:
    """Save on every rank; rank 0 then completes the folder, moves `latest` (and `best`) and prunes old ones.

    A write that fails (a full disk) on any rank removes the incomplete folder and ends the run on every rank
    with one message; the checkpoints before it stay intact.
    """
    tag = step_tag(step)
    ckpt = run.step(tag)
    if dist.is_main and ckpt.root.exists():
        shutil.rmtree(ckpt.root)  # a leftover of a crash, or a damaged copy: never mix its files with new ones
    ds.barrier()
    failure = _attempt(lambda: _write_shards(engine, run, ckpt, dist), ckpt.root)
    if not ds.any_rank(failure is not None, dist.device) and dist.is_main:
        failure = _attempt(lambda: _complete(engine, run, ckpt, state, tokenizer, metrics, keep_last), ckpt.root)
    if ds.any_rank(failure is not None, dist.device):
        if dist.is_main:
            shutil.rmtree(ckpt.root, ignore_errors=True)
        before = latest_tag(run)
        resume = f"a rerun resumes from {run.root / before}" if before else "no earlier checkpoint exists"
        raise UserError(f"train: {failure or 'another process failed to write its part'} while saving {ckpt.root};"
                        f" the incomplete checkpoint was removed and {resume}")
    return tag


def _write_shards(engine, run: RunDir, ckpt: CheckpointDir, dist: Dist) -> None:
    ds.save_engine(engine, run.root, ckpt.tag)
    torch.save(capture_rng(), ckpt.rng(dist.rank))


def _complete(engine, run: RunDir, ckpt: CheckpointDir, state: dict, tokenizer: Tokenizer, metrics: TrainMetrics,
              keep_last: int) -> None:
    """Rank 0, after every rank saved: what makes the folder stand alone, the checksums last, then the pointers."""
    engine.module.config.to_json_file(ckpt.model_config)  # the model rebuilds from it for inference
    tokenizer.save(ckpt.tokenizer)
    copy_metrics(metrics, TrainMetrics(ckpt.metrics))
    write_json_atomic(ckpt.state, {**state, "tag": ckpt.tag})
    files = sorted(p for p in ckpt.root.rglob("*") if p.is_file() and p != ckpt.checksums)
    write_json_atomic(ckpt.checksums, {str(p.relative_to(ckpt.root)): sha256(p) for p in files})
    write_text_atomic(run.latest, ckpt.tag)
    if state.get("best_tag") == ckpt.tag:
        write_text_atomic(run.best, ckpt.tag)
    prune(run, keep_last)


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


def prune(run: RunDir, keep_last: int) -> None:
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


def load(engine, run: RunDir, tag: str, dist: Dist, universal: Path | None = None) -> dict:
    """Load weights, optimizer and this rank's RNG state (checked by verify first); return the saved training state.

    universal: the step converted for another world size (prepare_elastic_resume); a rank the saving run did not
    have starts a generator of its own, seeded by the step and its rank.
    """
    ckpt = run.step(tag)
    if universal is not None:
        ds.load_engine(engine, universal.parent, universal.name, universal=True)
    else:
        ds.load_engine(engine, run.root, tag)
    state = json.loads(ckpt.state.read_text())
    if ckpt.rng(dist.rank).is_file():
        restore_rng(torch.load(ckpt.rng(dist.rank), weights_only=True))
    else:
        seed_rng(1_000_003 * state["step"] + dist.rank)
    return state


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------- elastic resume


def saved_world_size(run: RunDir, tag: str) -> int | None:
    return json.loads(run.step(tag).state.read_text()).get("world_size")


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
    if not ds.partitioned_optimizer(source):
        echo(f"train: {tag} was saved by {saved} processes, this run has {dist.world_size}; its optimizer state is whole,"
             " so it loads as it is")
        return None
    out, failed = run.universal(tag), run.universal(tag).with_suffix(".failed")
    if dist.is_main:
        failed.unlink(missing_ok=True)  # of an earlier attempt: gone before any rank looks
    ds.barrier()
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
    ds.barrier()
    return out


def convert_universal(source: Path, out: Path) -> None:
    """source -> out in DeepSpeed's universal format, built beside out and moved into place with its checksums."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # damaged: convert again
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.convert_to_universal(source, tmp)
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
    for name in ("summary", "samples"):
        if getattr(src, name).is_file():
            shutil.copyfile(getattr(src, name), getattr(dst, name))


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


# ------------------------------------------------------------------------------------------ for inference


def find_checkpoint(folder: str | Path, key: str) -> CheckpointDir | None:
    """The verified checkpoint a folder names: a step folder itself, or a run folder's newest intact one;
    None when the folder is neither. A damaged checkpoint is a UserError naming the file (key: the param)."""
    folder = Path(folder)
    ckpt = CheckpointDir(folder)
    if ckpt.checksums.is_file() or ckpt.state.is_file():
        problem = verify(ckpt)
        if problem:
            raise UserError(f"{key}: checkpoint {folder} cannot be used: {problem}")
        return ckpt
    if RunDir(folder).identity.is_file():
        tag = choose_resume(RunDir(folder))
        if tag is None:
            raise UserError(f"{key}: the run folder {folder} has no complete checkpoint yet")
        return RunDir(folder).step(tag)
    return None


def checkpoint_weights(ckpt: CheckpointDir) -> dict:
    """The full model weights of a checkpoint, consolidated from its ZeRO partitions when there are several."""
    state = json.loads(ckpt.state.read_text())
    zero_stage = state["params"]["train"]["zero_stage"]
    return ds.checkpoint_weights(ckpt.root.parent, ckpt.tag, zero_stage)
