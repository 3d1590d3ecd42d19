"""The training loop: `setup` builds the run, `fit` trains it, `train` does both and exports the model."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import checkpoints as ckpt
from pipeline import engine as ds
from pipeline.config import Params, TrainConfig
from pipeline.data import WindowSampler, open_tokens, read_meta
from pipeline.errors import UserError
from pipeline.export import export_model
from pipeline.files import write_json_atomic
from pipeline.models import build_model, count_params, flops_per_token


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class State:
    """What a checkpoint restores besides weights and optimizer: where the run is."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    best_tag: str | None = None
    val_loss: float | None = None


@dataclass
class Run:
    p: Params
    dist: ds.Dist
    engine: object
    train_data: WindowSampler
    val_data: WindowSampler
    run_dir: Path
    accum: int
    flops_per_token: float
    peak_flops: float
    n_params: int
    log: "MetricsLog"
    state: State = field(default_factory=State)


def train(p: Params) -> dict | None:
    """Train (resuming when a compatible checkpoint exists) and export; the summary on rank 0, else None."""
    dist = ds.init_distributed()
    run = setup(p, dist)
    fit(run)
    export_model(run.engine, p, run.state.__dict__, dist)
    run.log.close()
    if not dist.is_main:
        return None
    return {
        "run": str(run.run_dir),
        "steps": run.state.step,
        "tokens seen": run.state.tokens_seen,
        "parameters": run.n_params,
        "val loss": run.state.val_loss,
        "best val loss": run.state.best_val_loss,
        "exported to": p.train.export_dir,
    }


def setup(p: Params, dist: ds.Dist) -> Run:
    t = p.train
    tokens_dir = Path(p.tokenize.out_dir)
    meta = read_meta(tokens_dir)
    block_size = p.model.shape[3]
    train_tokens = open_tokens(tokens_dir / "train.bin")
    val_tokens = open_tokens(tokens_dir / "val.bin")
    accum = t.accumulation(dist.world_size, block_size)
    global_batch = t.micro_batch_size * accum * dist.world_size

    # The data a run learns from, by content: re-tokenizing identical text keeps the run resumable.
    data = {"vocab_size": meta["vocab_size"], "eot_id": meta["eot_id"], "train_crc32": train_tokens.crc32, "val_crc32": val_tokens.crc32}
    identity = ckpt.run_identity(p, data, dist.world_size, accum)
    run_dir = ckpt.run_folder(t.out_dir, identity)
    tag = ckpt.latest_tag(run_dir)
    if dist.is_main:
        reason = ckpt.why_fresh(t.out_dir, identity) if tag is None else None
        print(f"train: resuming {run_dir}/{tag}" if tag else f"train: starting fresh in {run_dir}" + (f": {reason}" if reason else ""))

    # The same seed on every rank gives every rank the same initial weights.
    torch.manual_seed(t.seed)
    # A checkpoint loads in the training precision (DeepSpeed keeps fp32 master weights for bf16/fp16);
    # a fresh model starts in fp32 so its initialisation doesn't depend on the precision.
    dtype = torch.float32 if p.model.is_scratch else TORCH_DTYPES[t.precision]
    model = build_model(p.model, meta["vocab_size"], meta["eot_id"], dtype)
    if t.activation_checkpointing:
        # Recompute each block in backward; transformers 5 renamed the method (and its argument).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = count_params(model)
    ds_config, changed = ds.merge_user_config(ds.deepspeed_config(t, dist.world_size, block_size), t.deepspeed_config)
    if dist.is_main:
        for change in changed:
            print(f"train: {t.deepspeed_config} overrides {change}")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "run.json", identity)
        write_json_atomic(run_dir / "ds_config.json", ds_config)
    engine = ds.build_engine(model, ds_config)

    state = State()
    if tag:
        saved = ckpt.load(engine, run_dir, tag, dist)
        state = State(**{k: saved[k] for k in State.__dataclass_fields__})
    else:
        torch.manual_seed(t.seed + dist.rank)  # dropout differs across ranks, like their data

    return Run(
        p=p,
        dist=dist,
        engine=engine,
        train_data=WindowSampler(train_tokens.tokens, block_size, t.seed, global_batch, t.micro_batch_size, dist.rank, dist.world_size),
        val_data=WindowSampler(
            val_tokens.tokens, block_size, t.seed + 1, t.micro_batch_size * t.eval_batches * dist.world_size, t.micro_batch_size, dist.rank, dist.world_size
        ),
        run_dir=run_dir,
        accum=accum,
        flops_per_token=flops_per_token(model, n_params, block_size),
        peak_flops=ds.peak_tflops(t, dist.device) * 1e12 * dist.world_size,
        n_params=n_params,
        log=MetricsLog(t, dist, resume=tag is not None),
        state=state,
    )


def fit(run: Run) -> None:
    t, s, engine, dist = run.p.train, run.state, run.engine, run.dist
    engine.train()
    tokens_per_step = run.train_data.global_batch * run.train_data.block_size
    run.log.start(s.step, t.max_steps)
    clock, tokens_at_clock = time.perf_counter(), s.tokens_seen
    while s.step < t.max_steps:
        lr = lr_at(s.step, t)
        ds.set_lr(engine, lr)
        loss_sum = 0.0
        for micro in range(run.accum):
            x, y = run.train_data.micro_batch(s.step, micro, dist.device)
            loss = lm_loss(engine, x, y)
            engine.backward(loss)
            grad_norm = ds.step(engine, boundary=micro == run.accum - 1)
            loss_sum += loss.item()
        (loss_total,) = ds.all_reduce_sum([loss_sum], dist.device)
        train_loss = loss_total / (run.accum * dist.world_size)
        if not math.isfinite(train_loss):
            latest = ckpt.latest_tag(run.run_dir)
            raise UserError(
                f"train: the loss is {train_loss} at step {s.step + 1}; stopped without saving. The last good checkpoint is"
                f" {run.run_dir / latest if latest else 'none'}. Lower train.lr, raise train.warmup_steps or use train.precision=fp32/bf16."
            )
        s.step += 1
        s.tokens_seen += tokens_per_step

        if should_log(s.step, t):
            elapsed = time.perf_counter() - clock
            tokens_per_s = (s.tokens_seen - tokens_at_clock) / elapsed
            run.log.train(s, train_loss, lr, grad_norm, tokens_per_s, tokens_per_s * run.flops_per_token / run.peak_flops)
            clock, tokens_at_clock = time.perf_counter(), s.tokens_seen
        if should_eval(s.step, t) or should_save(s.step, t):
            s.val_loss = evaluate(run)
            if s.val_loss < s.best_val_loss:
                s.best_val_loss, s.best_tag = s.val_loss, f"step-{s.step:06d}"
            run.log.val(s)
        if should_save(s.step, t):
            ckpt.save(engine, run.run_dir, s.step, {**s.__dict__, "params": run.p.model_dump()}, dist, t.keep_last)
        run.log.advance(s)
    run.log.finish(s)


def should_log(step: int, t: TrainConfig) -> bool:
    return step % t.log_interval == 0 or step == t.max_steps


def should_eval(step: int, t: TrainConfig) -> bool:
    return step % t.eval_interval == 0 or step == t.max_steps


def should_save(step: int, t: TrainConfig) -> bool:
    return step % t.save_interval == 0 or step == t.max_steps


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr (default lr / 10) at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.final_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (t.lr - t.final_lr)


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; x, y are (B, T) inputs and targets shifted by one."""
    logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean val loss over the fixed val windows, each rank scoring its share."""
    run.engine.eval()
    total = 0.0
    for micro in range(run.p.train.eval_batches):
        x, y = run.val_data.micro_batch(0, micro, run.dist.device)
        total += lm_loss(run.engine, x, y).item()
    run.engine.train()
    (total,) = ds.all_reduce_sum([total], run.dist.device)
    return total / (run.p.train.eval_batches * run.dist.world_size)


class MetricsLog:
    """Rank 0's view of training: DVCLive metrics, a rich progress bar and plain log lines."""

    def __init__(self, t: TrainConfig, dist: ds.Dist, resume: bool):
        self.enabled = dist.is_main
        self.live = self.bar = None
        if not self.enabled:
            return
        from dvclive import Live

        self.live = Live(dir=t.metrics_dir, resume=resume, report=None, save_dvc_exp=False, dvcyaml=False)

    def start(self, step: int, max_steps: int) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"), TimeRemainingColumn(),
            console=console, disable=not console.is_terminal,
        )  # fmt: skip
        self.task = self.bar.add_task("", total=max_steps, completed=step)
        self.bar.start()

    def _metrics(self, s: State, values: dict) -> None:
        self.live.step = s.step
        for name, value in values.items():
            if value is not None:
                self.live.log_metric(name, value)
        self.live.log_metric("tokens", s.tokens_seen)

    def train(self, s: State, loss, lr, grad_norm, tokens_per_s, mfu) -> None:
        if not self.enabled:
            return
        self._metrics(s, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/tokens_per_s": tokens_per_s, "train/mfu": mfu})
        norm = "" if grad_norm is None else f" | grad norm {grad_norm:.3f}"
        self.bar.console.print(f"step {s.step:>6} | loss {loss:.4f} | lr {lr:.2e}{norm} | {tokens_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}%", highlight=False, soft_wrap=True)
        self.bar.update(self.task, description=f"loss {loss:.3f}")

    def val(self, s: State) -> None:
        if not self.enabled:
            return
        self._metrics(s, {"val/loss": s.val_loss, "val/perplexity": math.exp(min(s.val_loss, 50))})
        self.bar.console.print(f"step {s.step:>6} | val loss {s.val_loss:.4f} (best {s.best_val_loss:.4f})", highlight=False, soft_wrap=True)

    def advance(self, s: State) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=s.step)

    def finish(self, s: State) -> None:
        if self.enabled:
            self.bar.stop()
            self.live.make_summary()

    def close(self) -> None:
        if self.enabled:
            self.live.end()
