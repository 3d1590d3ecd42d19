"""Learning-rate schedules against their formulas, and what a resumed run does when max_steps is raised."""

import math

import pytest

from pipeline.config.train import TrainConfig
from pipeline.train.schedules import decay_end, lr_at


def schedule(**train) -> TrainConfig:
    return TrainConfig(**{"max_steps": 100, "warmup_steps": 10, "lr": 1e-3, "min_lr": 1e-4, **train})


def test_warmup_is_linear_from_lr_over_warmup_plus_one():
    t = schedule()
    assert [lr_at(s, t, 100) for s in (0, 4, 9)] == pytest.approx([1e-3 / 11, 5e-3 / 11, 1e-3 * 10 / 11])


@pytest.mark.parametrize("step", [10, 25, 55, 80, 100, 150])
def test_cosine_linear_constant_and_wsd_follow_their_formulas(step):
    progress = min(1.0, (step - 10) / 90)
    expected = {
        "cosine": 1e-4 + 0.5 * (1 + math.cos(math.pi * progress)) * 9e-4,
        "linear": 1e-3 - progress * 9e-4,
        "constant": 1e-3,
        # stable for the first 70% of the span after warmup, then linear to min_lr over the last 30%
        "wsd": 1e-3 if progress <= 0.7 else 1e-3 - (progress - 0.7) / 0.3 * 9e-4,
    }
    for name, value in expected.items():
        assert lr_at(step, schedule(schedule=name, decay_fraction=0.3), 100) == pytest.approx(value), name


def test_decay_steps_ends_the_decay_early_then_min_lr_holds():
    t = schedule(decay_steps=50)
    end, note = decay_end(t, 100, None)
    assert end == 50 and note is None
    assert lr_at(50, t, end) == pytest.approx(1e-4) and lr_at(99, t, end) == pytest.approx(1e-4)


def test_raising_max_steps_on_a_resumed_run_keeps_the_plan_and_says_so():
    t = schedule(max_steps=200)
    end, note = decay_end(t, 200, saved=100)  # the run was planned for 100 steps
    assert end == 100 and "min_lr holds" in note
    assert lr_at(150, t, end) == pytest.approx(1e-4)  # no jump back up the curve
    end, note = decay_end(schedule(max_steps=200, decay_steps=200), 200, saved=100)
    assert end == 200 and "changes course" in note  # asked for explicitly: said out loud
    assert decay_end(t, 100, saved=100) == (100, None)


def test_lowering_max_steps_on_a_resumed_run_says_the_decay_will_not_finish():
    end, note = decay_end(schedule(max_steps=60), 60, saved=100)
    assert end == 100 and "stops above min_lr" in note and "train.decay_steps=60" in note
