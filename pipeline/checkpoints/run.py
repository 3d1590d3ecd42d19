"""A run: its folder and identity, which checkpoint to resume (train.resume), and the checkpoint a folder names.

The run folder (file names in layout.py): <train.out_dir>/run-<id>/ holds one run, where <id> hashes everything that
must match to resume (model, data, optimizer settings, the global batch). A change of, say, train.lr gives a new
run folder, so the earlier run's checkpoints stay on disk and switching back resumes it. The number of processes
is not part of it: a checkpoint saved by N processes resumes on M, converted once to DeepSpeed's universal format
when its optimizer state is partitioned (run-<id>/universal/step-*, kept for the next resume).

    run-<id>/run.json         what the id hashes, readable
    run-<id>/ds_config.json   the DeepSpeed config that ran
    run-<id>/step-000100/     DeepSpeed's files, rng-rank<r>.pt per rank, config.json (the model's), tokenizer/,
                              metrics/ (the training curves so far), state.json (step, data position, best so
                              far, the resolved params: checkpoints/state.py), checksums.json (sha256 of every file; written last)
    run-<id>/latest, best     the tag of the newest complete checkpoint and of the best by val loss

A step folder stands alone: it loads for inference from any working directory, whatever happened to the
tokenize stage's output since. Nothing in it is unpickled beyond tensors and plain values, and it is used only
when every file matches its checksum: a damaged checkpoint is skipped (resume) or refused (inference) by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from contextlib import ExitStack
from pathlib import Path

from pipeline.checkpoints.folder import verify_checkpoint
from pipeline.config.all import Params
from pipeline.config.train import Batch, TrainConfig
from pipeline.errors import UserError
from pipeline.files import folder_lock, write_failure, write_json_atomic
from pipeline.infra.distributed import Dist, any_rank, barrier, broadcast
from pipeline.layout import CheckpointDir, RunDir
from pipeline.output import Echo, silent

# Not part of a run's identity as set: they only split the global batch across processes and micro steps. The
# global batch they add up to is (tokens_per_step), so a run continues on another number of processes when it is kept.
BATCH_SPLIT = {"grad_accum", "global_batch_tokens"}


# Raised when gptpipe changes what it builds from the same params (a model's activation or vocabulary padding)
# or what a run's identity holds, so a checkpoint of an earlier gptpipe is not resumed into a different model.
RUN_FORMAT = 3


def run_identity(p: Params, data: dict, batch: Batch, deepspeed_json: dict | None = None) -> dict:
    """Everything a checkpoint must agree with to be resumed, as flat dotted keys; data fingerprints the tokens, and
    deepspeed_json is the content of train.deepspeed_config (read by infra/deepspeed.py).

    The world size is not in it: the same global batch on another number of processes continues the same run.
    """
    identity = {"format": RUN_FORMAT, **{f"model.{k}": v for k, v in p.model.model_dump().items()}}
    # The train.* keys marked KEEPS_RUN in config/train.py (how long, how often, where) are left out: changing them keeps the run.
    kept = set(TrainConfig.identity_keys()) - BATCH_SPLIT
    if p.train.optimizer == "adamw":
        # The Muon keys came later: an AdamW run's identity stays what it was, so its checkpoints still resume.
        kept -= {"optimizer", "muon_lr", "muon_momentum", "muon_weight_decay"}
    if not p.train.document_mask:
        kept -= {"document_mask"}  # a later key too: runs without it keep their identity
    identity.update({f"train.{k}": v for k, v in p.train.model_dump().items() if k in kept})
    identity.update({f"data.{k}": v for k, v in data.items()})
    identity["train.tokens_per_step"] = batch.tokens_per_step
    if p.train.deepspeed_config:
        # What the JSON says, not where it lives: an edited file is another run, a moved one the same. Without a JSON
        # the key stays null, so runs without one keep their identity.
        identity["train.deepspeed_config"] = f"sha256:{hashlib.sha256(json.dumps(deepspeed_json, sort_keys=True).encode()).hexdigest()}"
    return identity


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_folder(out_dir: str | Path, identity: dict) -> RunDir:
    return RunDir(Path(out_dir) / f"run-{_hash(identity)}")


def why_fresh(out_dir: str | Path, identity: dict) -> str | None:
    """When other runs exist in out_dir, what differs from the newest: the reason this one starts fresh."""
    mine = run_folder(out_dir, identity)
    others = sorted(Path(out_dir).glob("run-*/run.json"), key=lambda f: f.stat().st_mtime)
    # A folder set aside by resume: never holds these very settings: it says nothing about why this one is fresh.
    others = [f for f in others if RunDir(f.parent) != mine and json.loads(f.read_text()) != identity]
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


def open_run(t: TrainConfig, identity: dict, dist: Dist, echo: Echo = silent, hold: ExitStack | None = None,
             inputs: dict[str, str] | None = None) -> tuple[RunDir, str | None]:
    """(the run folder, the checkpoint to resume or None), decided on rank 0 and the same on every rank.

    train.resume: auto resumes the newest intact checkpoint; never moves an existing folder aside to
    <folder>.previous and starts over (refused, nothing moved, when one of inputs, {param: path}, is that folder or
    inside it); a checkpoint folder resumes that step (a later branch is moved aside).
    Rank 0 first takes train.out_dir's lock into hold, held until the caller closes it: a second training into the
    same out_dir while this one runs gets one message, before either moves or writes anything.
    """
    answer = None
    if dist.is_main:
        try:
            if hold is not None:
                hold.enter_context(folder_lock(os.path.realpath(t.out_dir), "train.out_dir", inside=True))
            run, tag = _open_run(t, identity, echo, inputs or {})
            answer = ("ok", (str(run.root), tag))
        except UserError as e:
            answer = ("error", str(e))
    kind, value = broadcast(answer) if dist.world_size > 1 else answer
    if kind == "error":
        raise UserError(value)
    return RunDir(value[0]), value[1]


def _open_run(t: TrainConfig, identity: dict, echo: Echo, inputs: dict[str, str]) -> tuple[RunDir, str | None]:
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
        check_moves_no_input(run.root, inputs)
        aside = set_aside(run.root)
        echo(f"train: train.resume=never: starting over; the earlier {run.root} is now {aside} (nothing deleted)")
        return run, None
    if t.run_name and run.identity.is_file():
        saved = json.loads(run.identity.read_text())
        if saved != identity:
            raise UserError(f"train.run_name={t.run_name}: {run.root} holds a run with other settings ({differences(saved, identity)});"
                            " choose another run_name, or set train.resume=never to start it over (the old folder is kept as"
                            f" {run.root.name}.previous)")
    return run, choose_resume(run, echo)


def check_moves_no_input(folder: Path, inputs: dict[str, str]) -> None:
    """UserError when an input (model.init) is folder or inside it: setting folder aside would take it away."""
    real = os.path.realpath(folder)
    for key, path in inputs.items():
        where = os.path.realpath(path)
        if where == real or where.startswith(real + os.sep):
            raise UserError(f"train.resume=never would move {folder} aside to start over, but {key}={path!r} is"
                            f" {'that folder' if where == real else 'inside it'}: training would then start from a model that is"
                            f" gone. Nothing was moved: choose another train.run_name, or copy the model out of {folder} and"
                            f" point {key} at the copy")


def set_aside(folder: Path) -> Path:
    """Move a run folder out of the way for a fresh start, never over an earlier one: <run>.previous, then
    <run>.previous.2, .3, ... (each --fresh keeps what came before; deleting old runs is the user's call)."""
    aside, n = folder.with_name(folder.name + ".previous"), 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.previous.{n}")
    folder.rename(aside)
    return aside


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
    barrier()
    unseen = not run.identity.is_file()
    if any_rank(unseen, dist.device):
        where = f"rank {dist.rank} on {socket.gethostname()} cannot see {run.identity}" if unseen else "another rank cannot see it"
        raise UserError(f"train.out_dir={run.root.parent} must be on storage every node sees (a shared file system): {where},"
                        " which rank 0 wrote")


def choose_resume(run: RunDir, echo: Echo = silent, key: str = "train") -> str | None:
    """The newest intact checkpoint of the run, or None when it has none (a fresh start).

    `latest` is a convenience, not the only record: a missing or bad pointer falls back to the newest step
    folder that verifies. A run whose every complete checkpoint is damaged is an error, never overwritten. A step
    folder removed while it is read (the run that writes the folder pruning it) is not damage: the folder is listed
    again, for the steps saved since. key: the param that named the run, for messages.
    """
    removed: list[str] = []
    for _ in range(3):
        damaged, gone = [], []
        for ckpt in [c for c in reversed(run.steps()) if c.checksums.is_file()]:
            try:
                problem = verify_checkpoint(ckpt)
            except FileNotFoundError:
                if ckpt.root.is_dir():
                    raise
                problem = "removed"
            if problem is None:
                pointer = run.latest.read_text().strip() if run.latest.is_file() else None
                for tag, why in damaged:
                    echo(f"{key}: skipping checkpoint {run.root / tag}: {why}")
                if pointer != ckpt.tag:
                    echo(f"{key}: `latest` names {pointer or 'nothing'}; the newest intact checkpoint is {ckpt.tag}")
                return ckpt.tag
            if not ckpt.root.is_dir():
                gone.append(ckpt.tag)
            else:
                damaged.append((ckpt.tag, problem))
        removed += gone
        if not gone:
            break
    if removed:
        others = f"; the others are damaged ({'; '.join(f'{tag}: {why}' for tag, why in damaged)})" if damaged else ""
        raise UserError(f"{key}: the checkpoints {', '.join(sorted(set(removed)))} of {run.root} were removed while they were"
                        f" being read (is a run pruning the folder, train.keep_last?){others}. Nothing was overwritten: try"
                        " again once that run has saved its next checkpoint")
    if damaged:
        listing = "; ".join(f"{tag}: {why}" for tag, why in damaged)
        raise UserError(f"{key}: every checkpoint in {run.root} is damaged ({listing}). Nothing was overwritten: move the"
                        f" folder away (mv {run.root} {run.root}.damaged) to start this run over, or restore it from a backup")
    return None


def find_checkpoint(folder: str | Path, key: str) -> CheckpointDir | None:
    """The verified checkpoint a folder names: a step folder itself, or a run folder's newest intact one;
    None when the folder is neither. A damaged checkpoint is a UserError naming the file (key: the param)."""
    folder = Path(folder)
    ckpt = CheckpointDir(folder)
    if ckpt.checksums.is_file() or ckpt.state.is_file():
        try:
            problem = verify_checkpoint(ckpt)
        except FileNotFoundError:
            if folder.is_dir():
                raise
            problem = "removed"
        if not folder.is_dir():  # pruned by the run that wrote it, or moved
            raise UserError(f"{key}: checkpoint {folder} was removed while it was being read (is a run pruning its folder,"
                            " train.keep_last?): name a newer step, or the run folder for its newest")
        if problem:
            raise UserError(f"{key}: checkpoint {folder} cannot be used: {problem}")
        return ckpt
    if RunDir(folder).identity.is_file():
        tag = choose_resume(RunDir(folder), key=key)
        if tag is None:
            raise UserError(f"{key}: the run folder {folder} has no complete checkpoint yet")
        return RunDir(folder).step(tag)
    return None
