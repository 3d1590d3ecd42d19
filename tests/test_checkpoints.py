"""checkpoints/: state.json through its one owner, and a run's identity as the schema marks it."""

import math
import re

from conftest import ROOT

from pipeline.checkpoints.run import run_folder, run_identity
from pipeline.checkpoints.state import TrainState
from pipeline.config.all import Params
from pipeline.config.train import TrainConfig


def test_state_json_round_trips_through_its_owner(tmp_path):
    state = TrainState(step=12, tokens_seen=3072, best_val_loss=math.inf, best_tag=None, val_loss=None, decay_end=40)
    saved = state.saved_as("step-000012", 2, {"train": {"zero_stage": 3}})
    saved.write(tmp_path / "state.json")
    back = TrainState.read(tmp_path / "state.json")
    assert back == saved and back.zero_stage == 3 and back.best_val_loss == math.inf
    assert back.loop_state() == state  # a resumed run records its own tag, world size and params


def test_a_state_of_another_gptpipe_version_reads_with_defaults(tmp_path):
    (tmp_path / "state.json").write_text('{"step": 4, "tag": "step-000004", "tokens_seen": 64, "from_the_future": 1}')
    state = TrainState.read(tmp_path / "state.json")
    assert (state.step, state.tag, state.world_size, state.zero_stage) == (4, "step-000004", None, 0)


def test_every_reader_of_state_json_goes_through_its_owner():
    """Outside checkpoints/state.py a step folder's state.json is only named (is_file, .name) or handed to TrainState."""
    found = []
    for path in (ROOT / "pipeline").rglob("*.py"):
        if path.name == "state.py" and path.parent.name == "checkpoints":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # A CheckpointDir's state path: ckpt.state, run.step(tag).state
            for use in re.finditer(r"(\bckpt|\.step\([^)]*\))\.state\b(\.\w+)?", line):
                ok = use.group(2) in (".is_file", ".name") or "TrainState.read(" in line or ".write(ckpt.state)" in line
                assert ok, f"{path.relative_to(ROOT)}:{number} reads state.json by itself: {line.strip()}"
                found.append(line)
    assert len(found) >= 4  # the pattern finds the readers that exist


DATA = {"vocab_size": 4096, "eot_id": 0, "train_crc32": 1, "val_crc32": 2}


def test_the_run_identity_is_unchanged_so_existing_checkpoints_resume():
    """The run folder names of gptpipe before the schema carried KEEPS_RUN: the same params resume the same runs."""
    p = Params()
    assert run_folder("x", run_identity(p, DATA, p.train.batch(1, p.model.block_size))).root.name == "run-9f91927d6d4c"
    p = Params.model_validate({"train": {"zero_stage": 2, "lr": 3e-4, "precision": "bf16"}, "model": {"arch": "llama", "n_kv_head": 2}})
    data = {**DATA, "vocab_size": 65}
    assert run_folder("x", run_identity(p, data, p.train.batch(2, 128))).root.name == "run-6c14d641de71"


def test_keys_that_keep_the_run_change_no_identity_and_the_others_do():
    base = Params()
    identity = run_identity(base, DATA, base.train.batch(1, 128))
    kept = set(TrainConfig.model_fields) - set(TrainConfig.identity_keys())
    assert {"max_steps", "eval_interval", "out_dir", "collective_timeout"} <= kept and "lr" not in kept
    for key, value in {"max_steps": 999, "eval_interval": 7, "keep_last": 9, "compile": True}.items():
        p = Params.model_validate({"train": {key: value}})
        assert run_identity(p, DATA, p.train.batch(1, 128)) == identity, key
    for key, value in {"lr": 1e-4, "weight_decay": 0.0, "zero_stage": 1, "seed": 7}.items():
        p = Params.model_validate({"train": {key: value}})
        assert run_identity(p, DATA, p.train.batch(1, 128)) != identity, key


def test_train_problems_from_every_group_come_in_one_message():
    import pytest

    from pipeline import params
    from pipeline.errors import UserError

    with pytest.raises(UserError) as e:
        params.validate_params({"train": {"min_lr": 1.0, "lr": 0.1, "offload_params": True, "run_name": "a b", "include": "localhost:0", "num_gpus": 2}})
    for key in ("train.min_lr", "train.offload_params", "train.run_name", "train.include"):
        assert key in str(e.value), key


DATA = {"vocab_size": 4096, "eot_id": 0, "train_crc32": 1, "val_crc32": 2}


def test_the_default_runs_identity_is_pinned():
    """Issue 30: resolving the DeepSpeed JSON into the identity leaves runs without one as they were, so their
    checkpoints keep resuming (the values are what gptpipe computed before that change)."""
    import yaml

    from pipeline import params

    for raw, pinned in [({}, "run-9f91927d6d4c"), (yaml.safe_load((ROOT / "params.yaml").read_text()), "run-7e756ecfa42a")]:
        p = params.validate_params(raw)
        assert run_folder("ckpt", run_identity(p, DATA, p.train.batch(1, p.model.block_size))).root.name == pinned


def test_a_deepspeed_json_counts_in_the_identity_by_its_content(tokens_dir, tmp_path):
    """An edited JSON is another run (before, only its path counted, so the edit resumed the old run with other engine
    settings); the same content elsewhere, or reformatted, is the same run."""
    from conftest import run_training, tiny_params

    ds = tmp_path / "ds.json"
    ds.write_text('{"wall_clock_breakdown": false}')
    raw = tiny_params(tokens_dir, tmp_path, max_steps=4, eval_interval=4, save_interval=4, deepspeed_config=str(ds))
    first = run_training(raw)["run"]
    moved = tmp_path / "elsewhere.json"
    moved.write_text('{\n  "wall_clock_breakdown":   false\n}\n')
    assert run_training({**raw, "train": {**raw["train"], "deepspeed_config": str(moved)}})["run"] == first
    ds.write_text('{"wall_clock_breakdown": false, "zero_optimization": {"reduce_bucket_size": 1000000}}')
    assert run_training(raw)["run"] != first
