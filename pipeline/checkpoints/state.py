"""state.json, where a run stands at a saved step, and an export's gptpipe.json, what its weights are and what trained
them: the one owner of both files, which writes and reads them."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from pipeline.files import write_json_atomic
from pipeline.layout import CheckpointDir, ExportDir, RunDir


@dataclass
class TrainState:
    """What a checkpoint restores besides weights, optimizer and RNG: the loop's position and record, and (in a
    saved step) which step it is, how many processes saved it and the resolved params that trained it."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    best_tag: str | None = None
    val_loss: float | None = None
    evals_without_improvement: int = 0  # toward train.early_stopping_patience
    decay_end: int | None = None  # the schedule's plan, kept when max_steps is raised later
    train_seconds: float = 0.0  # time in optimizer steps so far, over every resume
    reached_target: dict | None = None  # train.target_loss's record: the first evaluation at or below it
    # Each evaluation that lowered the run's lowest val loss, [step, tokens, train_seconds, stage_seconds, val_loss]:
    # the first to reach any target is one of them, so a changed train.target_loss is answered from the run itself.
    val_minima: list = field(default_factory=list)
    tag: str | None = None  # the step folder's name, step-000100
    world_size: int | None = None  # processes that saved it: another number resumes through a universal conversion
    params: dict | None = None  # the resolved params.yaml, so the folder describes itself

    def saved_as(self, tag: str, world_size: int, params: dict) -> TrainState:
        """This state as a step folder records it."""
        return replace(self, tag=tag, world_size=world_size, params=params)

    def loop_state(self) -> TrainState:
        """Only what the loop carries on with (a resumed run records its own tag, world size and params)."""
        return replace(self, tag=None, world_size=None, params=None)

    @property
    def zero_stage(self) -> int:
        return int((self.params or {}).get("train", {}).get("zero_stage", 0))

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> TrainState:
        """The state in path; keys of other gptpipe versions are left out, missing ones take their defaults.
        ValueError when the file is not a state (verify_checkpoint turns it into a message naming the file)."""
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError(f"{path}: not a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


@dataclass(frozen=True)
class TrainedParams:
    """What trained a model gptpipe saved, as its own files say; a folder gptpipe did not write says nothing."""

    params: dict = field(default_factory=dict)  # the resolved params.yaml; {} when unknown

    @property
    def document_mask(self) -> bool:
        """train.document_mask: attention stayed inside each document, so a model is scored that way too."""
        train = self.params.get("train")
        return isinstance(train, dict) and bool(train.get("document_mask"))


def write_export_info(path: str | Path, info: dict, params: dict) -> None:
    """An export's gptpipe.json: info (which weights: step, val loss, dtype) and the resolved params that trained them."""
    write_json_atomic(path, {**info, "params": params})


def trained_params(source: str | Path) -> TrainedParams:
    """What trained the model in source: an export's gptpipe.json, a step folder's state.json, a run folder's newest
    step; nothing known for any other folder, a hub id, or a file that is not gptpipe's."""
    folder = Path(source)
    if RunDir(folder).latest.is_file():
        folder = RunDir(folder).step(RunDir(folder).latest.read_text().strip()).root
    try:
        if ExportDir(folder).info.is_file():
            saved = json.loads(ExportDir(folder).info.read_text(encoding="utf-8"))
            params = saved.get("params") if isinstance(saved, dict) else None
        elif CheckpointDir(folder).state.is_file():
            params = TrainState.read(CheckpointDir(folder).state).params
        else:
            params = None
    except ValueError:  # not JSON (or not UTF-8): not a file gptpipe wrote
        params = None
    return TrainedParams(params if isinstance(params, dict) else {})
