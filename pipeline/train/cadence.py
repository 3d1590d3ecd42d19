"""When things happen in training: what is due after each optimizer step, when to stop early, and the
throughput of the steps since the last log line. The loop asks; these decide."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from pipeline.checkpoints.state import TrainState
from pipeline.config.train import TrainConfig
from pipeline.layout import step_tag


@dataclass(frozen=True)
class Due:
    """What to do after a step; every one of them is due at the last step too."""

    log: bool
    eval: bool  # a checkpoint records the val loss it was saved at, so a save is always an eval
    hellaswag: bool
    sample: bool
    save: bool


class Cadence:
    """train.log_interval, eval_interval, hellaswag_interval, sample_interval and save_interval, and the last step."""

    def __init__(self, t: TrainConfig, total_steps: int):
        self.t, self.total_steps = t, total_steps

    def after(self, step: int) -> Due:
        last = step == self.total_steps

        def every(interval: int | None) -> bool:
            return bool(interval) and (step % interval == 0 or last)

        save = every(self.t.save_interval) or last  # save_interval 0: no periodic checkpoints, but the run's end is kept
        return Due(log=every(self.t.log_interval), eval=every(self.t.eval_interval) or save,
                   hellaswag=every(self.t.hellaswag_interval), sample=every(self.t.sample_interval), save=save)


class EarlyStopping:
    """The best val loss so far and train.early_stopping_patience; its record lives in the TrainState, so a
    resumed run counts on from where it was saved."""

    def __init__(self, t: TrainConfig):
        self.patience, self.min_delta = t.early_stopping_patience, t.early_stopping_min_delta

    def record(self, s: TrainState, val_loss: float) -> bool:
        """Note val_loss at step s.step; True when it is a new best (those weights are then worth saving)."""
        improved = val_loss < s.best_val_loss
        if val_loss <= s.best_val_loss - self.min_delta:
            s.evals_without_improvement = 0
        else:
            s.evals_without_improvement += 1
        s.val_loss = val_loss
        if improved:
            s.best_val_loss, s.best_tag = val_loss, step_tag(s.step)
        return improved

    def reason(self, s: TrainState) -> str | None:
        """Why the run stops here, or None while it goes on."""
        if not self.patience or s.evals_without_improvement < self.patience:
            return None
        return (f"stopped early at step {s.step}: {s.evals_without_improvement} evaluations without a val loss improvement of"
                f" {self.min_delta} or more (train.early_stopping_patience={self.patience}); best {s.best_val_loss:.4f} at {s.best_tag}")


class TimeToTarget:
    """train.target_loss: the first evaluation at or below it, with what it took to get there (steps, tokens, model
    FLOPs, seconds in training steps over every resume, seconds since this stage's process started). The record
    lives in the TrainState, so a resumed run keeps it; a run that never gets there says so, with no figure.

    The target is not part of the run's identity (changing it resumes the run), so a record belongs to the target it
    was made for: a resumed run redoes it from the evaluations the run has made (TrainState.val_minima)."""

    def __init__(self, t: TrainConfig):
        self.target, self.stop = t.target_loss, t.stop_at_target

    def record(self, s: TrainState, flops_per_token: float, stage_seconds: float) -> bool:
        """After an evaluation: True when this one is the first to reach the target."""
        if s.val_loss is None:
            return False
        if not s.val_minima or s.val_loss < s.val_minima[-1][4]:
            s.val_minima.append([s.step, s.tokens_seen, round(s.train_seconds, 3), round(stage_seconds, 3), s.val_loss])
        if self.target is None or s.reached_target is not None or s.val_loss > self.target:
            return False
        s.reached_target = self._made_from(s.val_minima[-1], flops_per_token)
        return True

    def resume(self, s: TrainState, flops_per_token: float) -> str | None:
        """Make a resumed run's record the one for this target; a line saying what changed, or None."""
        before = s.reached_target
        if s.val_minima:
            first = next((e for e in s.val_minima if self.target is not None and e[4] <= self.target), None)
            s.reached_target = self._made_from(first, flops_per_token) if first else None
        elif before is not None and before.get("loss") != self.target:
            s.reached_target = None  # a record of another target, and nothing to redo it from
        if s.reached_target == before or (before is not None and before.get("loss") == self.target):
            return None
        was = f"the record was for train.target_loss={before.get('loss')}" if before else "no target was reached before"
        now = self.describe(s) if self.target is not None else "no target now"
        return f"{was}; from the run's {len(s.val_minima)} best evaluations so far: {now}"

    def _made_from(self, minimum: list, flops_per_token: float) -> dict:
        step, tokens, train_seconds, stage_seconds, val_loss = minimum
        return {"loss": self.target, "step": step, "tokens": tokens, "flops": tokens * flops_per_token,
                "train_seconds": train_seconds, "stage_seconds": stage_seconds, "val_loss": val_loss}

    def reason(self, s: TrainState) -> str | None:
        if not self.stop or s.reached_target is None:
            return None
        return f"stopped at step {s.step}: the val loss {s.val_loss:.4f} reached train.target_loss={self.target} (train.stop_at_target)"

    def summary(self, s: TrainState) -> dict | None:
        """metrics.json's "target": the record with the target and reached: true, or reached: false alone."""
        if self.target is None:
            return None
        if s.reached_target is None:
            return {"loss": self.target, "reached": False}
        return {"loss": self.target, "reached": True, **s.reached_target}

    def describe(self, s: TrainState) -> str | None:
        """One line for the run's summary."""
        if self.target is None:
            return None
        r = s.reached_target
        if r is None:
            best = f" (best {s.best_val_loss:.4f})" if math.isfinite(s.best_val_loss) else ""
            return f"val loss {self.target} not reached{best}"
        return (f"val loss {self.target} reached at step {r['step']:,}: {r['train_seconds']:,.1f} s training,"
                f" {r['stage_seconds']:,.1f} s since the stage started, {r['tokens']:,} tokens, {r['flops']:.3g} FLOPs")


class Throughput:
    """Training time alone (evaluations and saves excluded) of the steps since the last log line."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.seconds, self.steps = tokens_per_step, 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds, self.steps = self.seconds + seconds, self.steps + 1

    def read(self) -> tuple[float, float]:
        """(tokens per second, milliseconds per step) over the window, which then starts again."""
        tokens_per_s = self.steps * self.tokens_per_step / self.seconds if self.seconds else math.nan
        ms = 1000 * self.seconds / self.steps if self.steps else math.nan
        self.seconds, self.steps = 0.0, 0
        return tokens_per_s, ms


def seconds_since_process_start() -> float:
    """Wall seconds since this process (the stage) started, its imports included."""
    import psutil  # DeepSpeed's dependency: always installed with gptpipe

    return time.time() - psutil.Process().create_time()
