"""Rank 0's record of training: metrics through DVCLive (DVC plots, `dvc exp show`), log lines and progress."""

from __future__ import annotations

import math
from contextlib import ExitStack

from pipeline.config import TrainConfig
from pipeline.layout import TrainMetrics
from pipeline.output import Echo, ProgressFactory, no_progress


class MetricsLog:
    """What training reports, on rank 0 only; other ranks get a log that does nothing.

    Curves go to DVCLive's files under train.metrics_dir (dvc.yaml declares them as plots), the summary to its
    metrics.json; log lines go to echo, and the step count to a progress bar the caller provides.
    """

    def __init__(self, t: TrainConfig, is_main: bool, resume: bool, echo: Echo):
        self.enabled, self.echo = is_main, echo
        self.live = None
        self._bar = ExitStack()
        self._advance = lambda n: None
        if not self.enabled:
            return
        from dvclive import Live

        # dvcyaml=False: dvc.yaml is ours, DVCLive must not rewrite it.
        self.live = Live(dir=t.metrics_dir, resume=resume, report=None, save_dvc_exp=False, dvcyaml=False)
        # dvc.yaml declares the curves folder as an output: it must exist even when a resumed run has no step left.
        TrainMetrics(t.metrics_dir).curves.mkdir(parents=True, exist_ok=True)

    def start(self, step: int, max_steps: int, progress: ProgressFactory = no_progress) -> None:
        if self.enabled:
            self._advance = self._bar.enter_context(progress("train steps", max_steps - step))

    def _metrics(self, step: int, tokens_seen: int, values: dict) -> None:
        self.live.step = step
        for name, value in values.items():
            if value is not None:
                self.live.log_metric(name, value)
        self.live.log_metric("tokens", tokens_seen)

    def train(self, step: int, tokens_seen: int, loss: float, lr: float, grad_norm: float | None, tokens_per_s: float,
              mfu: float) -> None:
        if not self.enabled:
            return
        values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/tokens_per_s": tokens_per_s, "train/mfu": mfu}
        self._metrics(step, tokens_seen, values)
        norm = "" if grad_norm is None else f" | grad norm {grad_norm:.3f}"
        self.echo(f"step {step:>6} | loss {loss:.4f} | lr {lr:.2e}{norm} | {tokens_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}%")

    def val(self, step: int, tokens_seen: int, val_loss: float, best_val_loss: float) -> None:
        if not self.enabled:
            return
        self._metrics(step, tokens_seen, {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50))})
        self.echo(f"step {step:>6} | val loss {val_loss:.4f} (best {best_val_loss:.4f})")

    def write_summary(self) -> None:
        """metrics.json as of now (a checkpoint keeps a copy; DVCLive resumes from it)."""
        if self.enabled:
            self.live.make_summary()

    def advance(self, steps: int = 1) -> None:
        self._advance(steps)

    def finish(self) -> None:
        if self.enabled:
            self._bar.close()
            self.live.make_summary()

    def close(self) -> None:
        if self.enabled:
            self.live.end()
