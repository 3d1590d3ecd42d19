"""Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay.

The decay ends at `decay_end` (train.decay_steps, else the run's first length) and min_lr holds after it, so
raising max_steps on a finished run continues at min_lr instead of jumping back up the curve.
"""

from __future__ import annotations

import math

from pipeline.config.train import TrainConfig


def lr_at(step: int, t: TrainConfig, decay_end: int) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    if t.schedule == "constant":
        return t.lr
    span = max(1, decay_end - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)  # 0 after warmup, 1 at decay_end and later
    if t.schedule == "cosine":
        return t.final_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.lr - t.final_lr)
    if t.schedule == "linear":
        return t.lr + progress * (t.final_lr - t.lr)
    # wsd: stable at lr, then a linear decay over the last decay_fraction of the span.
    stable = 1.0 - t.decay_fraction
    if progress <= stable:
        return t.lr
    return t.lr + (progress - stable) / t.decay_fraction * (t.final_lr - t.lr)


def decay_end(t: TrainConfig, total_steps: int, saved: int | None) -> tuple[int, str | None]:
    """(the step the decay ends at, a note for the log when a resumed run's schedule differs from its plan).

    A fresh run plans it from train.decay_steps or its length; a resumed run keeps its plan unless decay_steps
    is set, so raising max_steps extends the run at min_lr rather than re-opening the curve.
    """
    if t.decay_steps is not None:
        if saved is not None and saved != t.decay_steps:
            return t.decay_steps, f"the decay now ends at step {t.decay_steps} (train.decay_steps), not {saved}: the learning rate changes course here"
        return t.decay_steps, None
    if saved is None:
        return total_steps, None
    if total_steps > saved:
        return saved, (f"{total_steps} steps now, but the schedule planned {saved}: min_lr holds for the steps after it"
                       " (set train.decay_steps to plan a new decay)")
    if total_steps < saved:
        return saved, (f"the run now ends at step {total_steps}, before the end of its planned decay at {saved}: it stops above min_lr"
                       f" (set train.decay_steps={total_steps} to finish the decay by then)")
    return saved, None
