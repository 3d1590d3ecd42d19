"""Checkpoints under attack and damage: planted pickles, bad pointers, flipped bytes, missing and empty files.

Each case damages a copy of a real run (checkpoints at steps 4 and 8), then resumes it to step 12, samples or
evaluates from it. Nothing planted may run; a damaged checkpoint is named and skipped (resume) or refused
(inference); a resumed run still ends bit-identical to an uninterrupted one.
"""

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import exported_weights, run_training, tiny_params

from pipeline import params
from pipeline.checkpoints.deepspeed_io import read_zero_weights
from pipeline.checkpoints.folder import prune_checkpoints as prune
from pipeline.errors import UserError
from pipeline.eval.stage import evaluate_model as evaluate
from pipeline.layout import RunDir
from pipeline.model.inference import load_for_inference


class Planted:
    """A pickle that runs code when loaded: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def run_folder(root: Path) -> RunDir:
    (run,) = (root / "checkpoints").glob("run-*")
    return RunDir(run)


@pytest.fixture(scope="module")
def runs(tokens_dir, tmp_path_factory) -> dict:
    """Per ZeRO stage: a run trained straight to step 12, with checkpoints at 4, 8 and 12."""
    out = {}
    for stage in (0, 1, 3):
        base = tmp_path_factory.mktemp(f"zero{stage}")
        run_training(tiny_params(tokens_dir, base / "to12", max_steps=12, save_interval=4, zero_stage=stage))
        out[stage] = base
    return out


def damaged_copy(runs: dict, stage: int, tmp_path: Path) -> tuple[Path, RunDir]:
    """The run as a kill right after step 8 leaves it (checkpoints 4 and 8, `latest` at 8), to damage."""
    shutil.copytree(runs[stage] / "to12" / "checkpoints", tmp_path / "checkpoints")
    run = run_folder(tmp_path)
    shutil.rmtree(run.root / "step-000012")
    run.latest.write_text("step-000008")
    return tmp_path, run


def reseal(ckpt: Path) -> None:
    """Rewrite checksums.json to match the files, as someone handing out a tampered checkpoint would."""
    listed = json.loads((ckpt / "checksums.json").read_text())
    for name in listed:
        listed[name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "checksums.json").write_text(json.dumps(listed))


def resume_to_12(tokens_dir: Path, root: Path, stage: int, capfd) -> str:
    run_training(tiny_params(tokens_dir, root, max_steps=12, save_interval=4, zero_stage=stage))
    return capfd.readouterr().out


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


PICKLED = [
    (0, "rng-rank0.pt"), (0, "mp_rank_00_model_states.pt"),
    (1, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"), (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
]  # fmt: skip


@pytest.mark.parametrize("stage, name", PICKLED)
def test_a_planted_pickle_never_runs_and_is_named(runs, tokens_dir, tmp_path, capfd, stage, name):
    root, run = damaged_copy(runs, stage, tmp_path)
    marker = tmp_path / "pwned"
    step8 = run.step("step-000008").root
    torch.save({"module": Planted(marker)}, step8 / name)
    reseal(step8)

    with pytest.raises(UserError, match=rf"{name}: it holds io.open, which loading would run as code"):
        load_for_inference(step8, key="--model")
    raw = tiny_params(tokens_dir, root, zero_stage=stage)
    raw["evaluate"] = {"model_dir": str(step8), "metrics_file": str(tmp_path / "m.json")}
    with pytest.raises(UserError, match=rf"evaluate.model_dir: checkpoint .*step-000008 cannot be used: {name}"):
        evaluate(params.validate_params(raw))
    out = resume_to_12(tokens_dir, root, stage, capfd)
    assert f"skipping checkpoint {run.root / 'step-000008'}: {name}: it holds io.open" in out
    assert "resuming" in out and "step-000004" in out
    assert not marker.exists()
    assert_same_weights(exported_weights(root), exported_weights(runs[stage] / "to12"))


def flip_bytes(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(count):
        data[middle + i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    # name: (what is done to the run folder, the file the message names, the step resumed)
    "latest deleted": (lambda run: run.latest.unlink(), None, 8),
    "latest emptied": (lambda run: run.latest.write_text(""), None, 8),
    "latest names a missing step": (lambda run: run.latest.write_text("step-000099"), None, 8),
    "latest points outside the folder": (lambda run: run.latest.write_text("../../../etc"), None, 8),
    "newest state.json deleted": (lambda run: (run.root / "step-000008" / "state.json").unlink(), "state.json is missing", 4),
    "state.json of another step": (
        lambda run: (run.root / "step-000008" / "state.json").write_text(
            (run.root / "step-000004" / "state.json").read_text()
        ), "state.json is corrupt", 4),
    "state.json of another step, resealed": (
        lambda run: ((run.root / "step-000008" / "state.json").write_text(
            (run.root / "step-000004" / "state.json").read_text()
        ), reseal(run.root / "step-000008")), "state.json describes step-000004", 4),
    "16 bytes flipped in the weights": (lambda run: flip_bytes(run.root / "step-000008" / "mp_rank_00_model_states.pt"),
                                        "mp_rank_00_model_states.pt is corrupt", 4),
    "rng file deleted": (lambda run: (run.root / "step-000008" / "rng-rank0.pt").unlink(), "rng-rank0.pt is missing", 4),
    "zero-byte weights": (lambda run: (run.root / "step-000008" / "mp_rank_00_model_states.pt").write_bytes(b""),
                          "mp_rank_00_model_states.pt is corrupt", 4),
    "truncated weights": (lambda run: (run.root / "step-000008" / "mp_rank_00_model_states.pt").write_bytes(
        (run.root / "step-000008" / "mp_rank_00_model_states.pt").read_bytes()[:1000]), "mp_rank_00_model_states.pt is corrupt", 4),
    "checksums.json deleted": (lambda run: (run.root / "step-000008" / "checksums.json").unlink(), None, 4),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_falls_back_to_the_newest_intact_checkpoint_and_stays_exact(runs, tokens_dir, tmp_path, capfd, case):
    damage, named, resumed = DAMAGE[case]
    root, run = damaged_copy(runs, 0, tmp_path)
    step4 = (run.root / "step-000004" / "checksums.json").read_bytes()
    damage(run)
    out = resume_to_12(tokens_dir, root, 0, capfd)
    assert f"resuming {run.root}/step-{resumed:06d}" in out, out
    if named:
        assert f"skipping checkpoint {run.root / 'step-000008'}: {named}" in out, out
    assert (run.root / "step-000004" / "checksums.json").read_bytes() == step4  # never overwritten
    assert run.latest.read_text() == "step-000012"
    assert_same_weights(exported_weights(root), exported_weights(runs[0] / "to12"))


def test_a_run_whose_every_checkpoint_is_damaged_is_an_error_not_a_fresh_start(runs, tokens_dir, tmp_path):
    root, run = damaged_copy(runs, 0, tmp_path)
    for tag in ("step-000004", "step-000008"):
        flip_bytes(run.root / tag / "mp_rank_00_model_states.pt")
    before = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"every checkpoint in .* is damaged .*Nothing was overwritten: move the folder away"):
        run_training(tiny_params(tokens_dir, root, max_steps=12, save_interval=4))
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == before


def test_pruning_keeps_the_step_latest_names(runs, tmp_path):
    _, run = damaged_copy(runs, 0, tmp_path)
    run.latest.write_text("step-000004")  # e.g. a pointer restored by hand
    prune(run, keep_last=1)
    assert sorted(c.tag for c in run.steps()) == ["step-000004", "step-000008"]


@pytest.mark.parametrize("stage, name", [(0, "mp_rank_00_model_states.pt"), (3, "zero_pp_rank_0_mp_rank_00_model_states.pt")])
def test_the_weight_loader_itself_refuses_a_planted_pickle(runs, tmp_path, stage, name):
    """Defence in depth: a file swapped after verify() still runs nothing when the weights are read."""

    root, run = damaged_copy(runs, stage, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"module": Planted(marker)}, run.root / "step-000008" / name)
    with pytest.raises(pickle.UnpicklingError):
        read_zero_weights(run.root, "step-000008", stage)
    assert not marker.exists()
