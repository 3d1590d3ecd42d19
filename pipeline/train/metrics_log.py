"""Rank 0's record of training: metrics through DVCLive (DVC plots, `dvc exp show`) and the loggers users already
watch (TensorBoard, Weights & Biases), samples, log lines and progress."""

from __future__ import annotations

import json
import math
import secrets
import shutil
from contextlib import ExitStack
from pathlib import Path

from pipeline.config.train import TrainConfig
from pipeline.errors import UserError
from pipeline.files import write_text_atomic
from pipeline.layout import TrainMetrics
from pipeline.output import Echo, ProgressFactory, no_progress


class CurveFiles:
    """DVCLive's files, which dvc.yaml declares and `dvc plots` / `dvc exp show` read: plots/metrics/<name>.tsv, a
    row per logged step, and metrics.json, the latest value of each metric nested by "/" plus "step".

    Written here in DVCLive's exact format (a test compares the two byte for byte): the dvclive package costs a
    training process about 0.55 s (pandas among its imports, git queries when it starts) for a few appends.
    A fresh run starts from empty curves, as DVCLive's does; a resume appends to the curves its checkpoint restored.
    """

    def __init__(self, files: TrainMetrics, resume: bool):
        self.files, self.step, self.summary = files, 0, {}
        if resume:
            try:
                self.summary = json.loads(files.summary.read_text())
            except (OSError, ValueError):
                self.summary = {}
        else:
            shutil.rmtree(files.curves, ignore_errors=True)
            for name in ("metrics.json", "params.yaml", "report.html", "report.md"):  # what DVCLive clears
                (files.root / name).unlink(missing_ok=True)

    def log(self, name: str, value: float | int) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # as DVCLive: "nan", "inf" (JSON has no such numbers)
        path = self.files.curves / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "" if path.exists() else f"step\t{name.rpartition('/')[2]}\n"
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{header}{self.step}\t{value}\n")
        *sections, leaf = name.split("/")
        node = self.summary
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value

    def write_summary(self) -> None:
        self.summary["step"] = self.step
        write_text_atomic(self.files.summary, json.dumps(self.summary, indent=4) + "\n")


class MetricsLog:
    """What training reports, on rank 0 only; other ranks get a log that does nothing.

    Curves go to DVCLive's files under train.metrics_dir (CurveFiles; dvc.yaml declares them as plots), the summary
    to its metrics.json, and each metric also to TensorBoard / W&B when train.loggers names them; samples go to
    samples/samples.jsonl there; log lines go to echo, and the step count to a progress bar the caller provides.
    """

    def __init__(self, t: TrainConfig, is_main: bool, resume: bool, echo: Echo, run_name: str, config: dict,
                 run_root: Path | None = None, start_step: int = 0):
        self.enabled, self.echo = is_main, echo
        self.live = self.tensorboard = self.wandb = None
        self.files = TrainMetrics(t.metrics_dir)
        self._bar = ExitStack()
        self._advance = lambda n: None
        if not self.enabled:
            return
        self.live = CurveFiles(self.files, resume)
        # dvc.yaml declares these as outputs: they exist even when a resumed run has no step left or samples are off.
        self.files.curves.mkdir(parents=True, exist_ok=True)
        if not resume or not self.files.samples.exists():
            self.files.samples.parent.mkdir(parents=True, exist_ok=True)
            self.files.samples.write_text("")
        if "tensorboard" in t.loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.loggers names tensorboard, which is not installed: pip install 'gptpipe[tensorboard]'") from None
            # purge_step: a resume drops the events a crashed run wrote after its checkpoint, so no step appears twice.
            self.tensorboard = SummaryWriter(log_dir=str(self.files.tensorboard / run_name), purge_step=start_step + 1 if resume else None)
        if "wandb" in t.loggers:
            try:
                import wandb
            except ImportError:
                raise UserError("train.loggers names wandb, which is not installed: pip install 'gptpipe[wandb]'") from None
            # WANDB_MODE=offline (or `wandb offline`) logs to files without network; `wandb sync` uploads them later.
            self.files.root.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=t.wandb_project, name=run_name, config=config, dir=str(self.files.root),
                                    id=wandb_id(run_root, resume), resume="allow" if resume else None)
            if resume and self.wandb.offline and start_step > 0:
                # Offline, W&B keeps the history in its own buffer until the run finishes: a killed run's .wandb file
                # may hold none of it (7 bytes), and there is no call to flush it. The curve restored with the
                # checkpoint is complete, so it goes into this run's new file again; W&B only accepts increasing
                # steps, so where the earlier file did hold them they are not added twice.
                rows = restored_curve(self.files)
                for step in sorted(rows):
                    self.wandb.log(rows[step], step=step)
                if rows:
                    echo(f"train: W&B offline: the restored curve (steps {min(rows)}-{max(rows)}) is logged again into this"
                         " run's new W&B file, since a killed run's file holds only what W&B had flushed")

    def start(self, step: int, max_steps: int, progress: ProgressFactory = no_progress) -> None:
        if self.enabled:
            self._advance = self._bar.enter_context(progress("train steps", max_steps - step))

    def _metrics(self, step: int, tokens_seen: int, values: dict) -> None:
        values = {name: value for name, value in values.items() if value is not None}
        self.live.step = step
        for name, value in values.items():
            self.live.log(name, value)
        self.live.log("tokens", tokens_seen)
        if self.tensorboard:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log({**values, "tokens": tokens_seen}, step=step)

    def train(self, step: int, tokens_seen: int, loss: float, accuracy: float | None, lr: float, grad_norm: float | None,
              tokens_per_s: float, ms_per_step: float, mfu: float | None) -> None:
        if not self.enabled:
            return
        perplexity = math.exp(min(loss, 50))
        values = {"train/loss": loss, "train/perplexity": perplexity, "train/token_accuracy": accuracy, "train/lr": lr, "train/grad_norm": grad_norm, "train/tokens_per_s": tokens_per_s,
                  "train/ms_per_step": ms_per_step, "train/mfu": mfu}
        self._metrics(step, tokens_seen, values)
        norm = "" if grad_norm is None else f" | grad norm {grad_norm:.3f}"
        utilisation = "" if mfu is None else f" | MFU {100 * mfu:.1f}%"
        acc = "" if accuracy is None else f" | acc {100 * accuracy:.1f}%"
        self.echo(f"step {step:>6} | loss {loss:.4f} | ppl {perplexity:,.2f}{acc} | lr {lr:.2e}{norm} | {ms_per_step:,.1f} ms | {tokens_per_s:,.0f} tok/s{utilisation}")

    def val(self, step: int, tokens_seen: int, val_loss: float, best_val_loss: float, extra: dict | None = None) -> None:
        if not self.enabled:
            return
        self._metrics(step, tokens_seen, {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50)), **(extra or {})})
        best = f" (best {best_val_loss:.4f})" if math.isfinite(best_val_loss) else ""
        self.echo(f"step {step:>6} | val loss {val_loss:.4f}{best}")

    def hellaswag(self, step: int, tokens_seen: int, scores: dict) -> None:
        if not self.enabled:
            return
        self._metrics(step, tokens_seen, {"hellaswag/acc": scores["acc"], "hellaswag/acc_norm": scores["acc_norm"]})
        self.echo(f"step {step:>6} | HellaSwag acc_norm {scores['acc_norm']:.4f} ({scores['n']} items)")

    def samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        """Text generated from fixed prompts: into samples.jsonl (the report shows them) and the log."""
        if not self.enabled:
            return
        with open(self.files.samples, "a", encoding="utf-8") as f:
            for prompt, text in samples:
                f.write(json.dumps({"step": step, "prompt": prompt, "text": text}, ensure_ascii=False) + "\n")
                self.echo(f"step {step:>6} | sample {prompt + text!r}")
        if self.wandb:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=["step", "prompt", "text"], data=[[step, p, t] for p, t in samples])}, step=step)

    def write_summary(self, extra: dict | None = None) -> None:
        """metrics.json as of now, plus extra entries (wall times, why the run stopped); a checkpoint keeps a copy."""
        if self.enabled:
            self.live.summary.update(extra or {})
            self.live.write_summary()

    def advance(self, steps: int = 1) -> None:
        self._advance(steps)

    def finish(self, extra: dict | None = None) -> None:
        if self.enabled:
            self._bar.close()
            self.write_summary(extra)

    def close(self) -> None:
        if self.enabled:
            self.live.write_summary()
            if self.tensorboard:
                self.tensorboard.close()
            if self.wandb:
                self.wandb.finish()


def restored_curve(files: TrainMetrics) -> dict[int, dict[str, float]]:
    """DVCLive's curves as {step: {metric: value}}: what a checkpoint restored (metrics/plots/metrics/*.tsv)."""
    rows: dict[int, dict[str, float]] = {}
    for name, points in files.read_curves().items():
        for step, value in points:
            rows.setdefault(step, {})[name] = value
    return rows


def wandb_id(run_root: Path | None, resume: bool) -> str | None:
    """The W&B run id of this training run, kept in its checkpoint folder: a resume continues the same W&B run,
    a fresh start (a new folder, or train.resume=never) gets a new one."""
    if run_root is None:
        return None
    path = Path(run_root) / "wandb_id"
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    write_text_atomic(path, run_id)
    return run_id
