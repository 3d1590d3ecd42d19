"""train's groups of keys: each builds and validates alone, reading only its own fields; the rules across groups are
TrainConfig's, with the keys and messages they always had; the intervals of what happens along a run are marked."""

import ast
import inspect
import textwrap

import pytest
from pydantic import ValidationError

from pipeline import params
from pipeline.config.train import (
    BatchConfig,
    CadenceConfig,
    LaunchConfig,
    LengthConfig,
    OptimizerConfig,
    OutputsConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
    TrainPart,
)
from pipeline.errors import UserError

GROUPS = [LengthConfig, BatchConfig, OptimizerConfig, PrecisionConfig, CadenceConfig, RunConfig, LaunchConfig, OutputsConfig]


def test_train_is_its_groups_and_each_group_builds_and_validates_alone():
    assert list(TrainConfig.model_fields) == [key for group in GROUPS for key in group.model_fields]
    for group in GROUPS:
        alone = group()
        assert alone.problems() == [], group.__name__
        assert group.model_validate(alone.model_dump()) == alone
    assert LengthConfig(max_steps=1).max_steps == 1  # warmup_steps (30 by default) is the optimizer's: not checked here
    assert CadenceConfig.model_validate({"eval_batches": 2, "log_interval": 5}).log_interval == 5


def test_a_group_alone_refuses_what_its_own_rules_refuse():
    with pytest.raises(ValidationError, match="max_steps: train.max_steps and train.epochs: exactly one must be set"):
        LengthConfig(max_steps=None)
    with pytest.raises(ValidationError, match="needs train.target_loss"):
        CadenceConfig.model_validate({"stop_at_target": True})
    with pytest.raises(ValidationError, match="is above train.lr"):
        OptimizerConfig(lr=0.1, min_lr=1.0)
    with pytest.raises(ValidationError, match="needs train.zero_stage=3"):
        PrecisionConfig(offload_params=True)


def own_reads(group: type) -> set[str]:
    """The names a group's own methods read from self."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(group)))
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"}


def test_a_group_reads_only_its_own_fields():
    """A rule that reads another group's field belongs on TrainConfig, where the groups meet."""
    for group in GROUPS:
        own = set(group.model_fields) | set(vars(group)) | set(dir(TrainPart))
        assert own_reads(group) <= own, (group.__name__, sorted(own_reads(group) - own))


def test_the_rules_across_groups_fire_from_train_with_the_same_keys_and_messages():
    with pytest.raises(UserError) as e:
        params.validate_params({"train": {"max_steps": 10, "warmup_steps": 20}})
    assert str(e.value) == "params: 1 problem\n  - train.warmup_steps: 20 is more than train.max_steps=10"
    with pytest.raises(ValidationError, match="20 is more than train.max_steps=10"):
        TrainConfig(max_steps=10, warmup_steps=20)
    # Problems from a group and from across groups come in one message.
    with pytest.raises(UserError) as e:
        params.validate_params({"train": {"max_steps": 10, "warmup_steps": 20, "stop_at_target": True}})
    assert "train.warmup_steps: 20 is more than" in str(e.value) and "train.stop_at_target: needs train.target_loss" in str(e.value)
    t = TrainConfig(max_steps=None, epochs=1, warmup_steps=50, micro_batch_size=16)
    with pytest.raises(UserError, match=r"train.warmup_steps=50 is more than the 4 steps train.epochs=1 gives \(64 windows, 16 per step\)"):
        t.total_steps(64, t.batch(1, 128))
    assert TrainConfig(max_steps=None, epochs=2, warmup_steps=0, micro_batch_size=16).total_steps(64, t.batch(1, 128)) == 8
    assert TrainConfig(micro_batch_size=3, eval_batches=5).eval_windows == 15


CADENCE = ["log_interval", "eval_interval", "hellaswag_interval", "sample_interval", "save_interval"]


def test_the_intervals_of_what_happens_along_a_run_are_marked_cadence_and_keep_the_run():
    """`gptpipe plan`'s probe switches off every field marked cadence; each keeps the run (no identity change)."""
    marked = [key for key, field in TrainConfig.model_fields.items() if (field.json_schema_extra or {}).get("cadence") is True]
    assert marked == CADENCE == TrainConfig.cadence_keys()
    assert [key for key in TrainConfig.model_fields if key.endswith("_interval")] == CADENCE  # every interval is marked
    assert not set(marked) & set(TrainConfig.identity_keys())
