"""The training loop: `setup` builds the run, `fit` trains it, `train` does both and exports the model."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import checkpoints as ckpt
from pipeline import engine as ds
from pipeline.config import Batch, Params, TrainConfig
from pipeline.data import WindowSampler, fixed_windows, open_verified, read_meta, window_batch
from pipeline.errors import UserError
from pipeline.export import export_model
from pipeline.layout import RunDir, TokensDir, TrainMetrics, step_tag
from pipeline.metrics import MetricsLog
from pipeline.models import build_model, count_params, flops_per_token
from pipeline.output import Echo, ProgressFactory, no_progress, silent
from pipeline.tokenizers import Tokenizer, load_tokenizer


@dataclass
class State:
    """What a checkpoint restores besides weights and optimizer: where the run is."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    best_tag: str | None = None
    val_loss: float | None = None

    @classmethod
    def from_saved(cls, saved: dict) -> State:
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__})


@dataclass
class Run:
    p: Params
    dist: ds.Dist
    engine: object
    tokenizer: Tokenizer
    batch: Batch
    train_data: WindowSampler
    val_tokens: np.ndarray
    val_starts: np.ndarray  # the fixed val windows, the same for every world size
    run_dir: RunDir
    n_params: int
    flops_per_token: float
    peak_flops: float
    log: MetricsLog
    state: State = field(default_factory=State)


def train(p: Params, progress: ProgressFactory = no_progress, echo: Echo = print) -> dict | None:
    """Train (resuming when a compatible checkpoint exists) and export; the summary on rank 0, else None."""
    dist = ds.init_distributed(timeout_s=p.train.collective_timeout)
    run = setup(p, dist, echo if dist.is_main else silent)
    try:
        fit(run, progress)
    except RuntimeError as e:
        raise collective_error(e, run) or e
    export_model(run.engine, p, run.state.__dict__, dist, run.tokenizer)
    run.log.close()
    if not dist.is_main:
        return None
    return {
        "run": str(run.run_dir.root),
        "steps": run.state.step,
        "tokens seen": run.state.tokens_seen,
        "parameters": run.n_params,
        "val loss": run.state.val_loss,
        "best val loss": run.state.best_val_loss,
        "exported to": p.train.export_dir,
    }


def collective_error(e: RuntimeError, run: Run) -> UserError | None:
    """One message for a collective that failed because another process froze or died, else None."""
    cause = ds.collective_failure(e)
    if cause is None:
        return None
    t, latest = run.p.train, ckpt.latest_tag(run.run_dir)
    why = (f"waited more than train.collective_timeout={t.collective_timeout} s for the other processes: one of them is frozen"
           if cause == "frozen" else "lost another process: it ended (see its log)")
    resume = f"; a rerun resumes from {run.run_dir.root / latest}" if latest else ""
    return UserError(f"train: rank {run.dist.rank} {why}, at step {run.state.step + 1}{resume}")


def setup(p: Params, dist: ds.Dist, echo: Echo = silent) -> Run:
    t, tokens = p.train, TokensDir(p.tokenize.out_dir)
    # Checked now, not after hours of training: the tokens against their CRC and vocabulary, the tokenizer's presence.
    meta = read_meta(tokens.root)
    train_tokens, val_tokens = (open_verified(tokens, split, meta) for split in ("train", "val"))
    tokenizer = load_tokenizer(tokens.tokenizer)
    batch = t.batch(dist.world_size, p.model.block_size)

    # The data a run learns from, by content: re-tokenizing identical text keeps the run resumable.
    data = {"vocab_size": meta["vocab_size"], "eot_id": meta["eot_id"], "train_crc32": train_tokens.crc32, "val_crc32": val_tokens.crc32}
    identity = ckpt.run_identity(p, data, dist.world_size, batch.grad_accum)
    run_dir = ckpt.run_folder(t.out_dir, identity)
    tag = ckpt.resume_point(run_dir, dist, echo)
    reason = ckpt.why_fresh(t.out_dir, identity) if tag is None else None
    echo(f"train: resuming {run_dir.root}/{tag}" if tag else f"train: starting fresh in {run_dir.root}" + (f": {reason}" if reason else ""))
    if p.model.trust_remote_code:
        echo(f"train: model.trust_remote_code is on: running the modelling code that ships with {p.model.init}")

    torch.manual_seed(t.seed)  # the same seed on every rank gives every rank the same initial weights
    model = build_model(p.model, meta["vocab_size"], meta["eot_id"], t.precision, t.activation_checkpointing)
    n_params = count_params(model)
    engine, ds_config = ds.build_engine(model, t, batch, echo)
    ckpt.start_run(run_dir, identity, ds_config, dist)
    state = State.from_saved(ckpt.load(engine, run_dir, tag, dist)) if tag else State()
    if not tag:
        torch.manual_seed(t.seed + dist.rank)  # dropout differs across ranks, like their data
    elif dist.is_main and run_dir.step(tag).metrics.is_dir():
        ckpt.copy_metrics(TrainMetrics(run_dir.step(tag).metrics), TrainMetrics(t.metrics_dir))

    return Run(
        p=p, dist=dist, engine=engine, tokenizer=tokenizer, batch=batch,
        train_data=WindowSampler(train_tokens.tokens, batch=batch, seed=t.seed, rank=dist.rank),
        val_tokens=val_tokens.tokens,
        val_starts=fixed_windows(val_tokens.tokens, batch.block_size, t.eval_windows, seed=t.seed + 1),
        run_dir=run_dir, n_params=n_params,
        flops_per_token=flops_per_token(model, n_params, batch.block_size),
        peak_flops=ds.peak_tflops(t, dist.device) * 1e12 * dist.world_size,
        log=MetricsLog(t, dist.is_main, resume=tag is not None, echo=echo),
        state=state,
    )  # fmt: skip


def fit(run: Run, progress: ProgressFactory = no_progress) -> None:
    t, s, engine, dist, batch = run.p.train, run.state, run.engine, run.dist, run.batch
    engine.train()
    run.log.start(s.step, t.max_steps, progress)
    clock, tokens_at_clock = time.perf_counter(), s.tokens_seen
    while s.step < t.max_steps:
        lr = lr_at(s.step, t)
        ds.set_lr(engine, lr)
        loss_sum = 0.0
        for micro in range(batch.grad_accum):
            x, y = run.train_data.micro_batch(s.step, micro, dist.device)
            loss = lm_loss(engine, x, y)
            engine.backward(loss)
            grad_norm = ds.step(engine, boundary=micro == batch.grad_accum - 1)
            loss_sum += loss.item()
        (loss_total,) = ds.all_reduce_sum([loss_sum], dist.device)
        train_loss = loss_total / (batch.grad_accum * batch.world_size)
        if not math.isfinite(train_loss):
            latest = ckpt.latest_tag(run.run_dir)
            raise UserError(
                f"train: the loss is {train_loss} at step {s.step + 1}; stopped without saving. The last good checkpoint is"
                f" {run.run_dir.root / latest if latest else 'none'}. Lower train.lr, raise train.warmup_steps or use train.precision=fp32/bf16."
            )
        s.step += 1
        s.tokens_seen += batch.tokens_per_step

        if should_log(s.step, t):
            elapsed = time.perf_counter() - clock
            tokens_per_s = (s.tokens_seen - tokens_at_clock) / elapsed
            run.log.train(s.step, s.tokens_seen, train_loss, lr, grad_norm, tokens_per_s, tokens_per_s * run.flops_per_token / run.peak_flops)
            clock, tokens_at_clock = time.perf_counter(), s.tokens_seen
        if should_eval(s.step, t) or should_save(s.step, t):
            s.val_loss = evaluate(run)
            if s.val_loss < s.best_val_loss:
                s.best_val_loss, s.best_tag = s.val_loss, step_tag(s.step)
            run.log.val(s.step, s.tokens_seen, s.val_loss, s.best_val_loss)
        if should_save(s.step, t):
            run.log.write_summary()
            saved = {**s.__dict__, "params": run.p.model_dump()}
            ckpt.save(engine, run.run_dir, s.step, saved, dist, t.keep_last, run.tokenizer, TrainMetrics(t.metrics_dir))
        run.log.advance()
    run.log.finish()


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


def lm_loss(model, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (mean, or sum over tokens); x, y are (B, T) inputs and targets shifted by one."""
    logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean val loss over the fixed val windows, each rank scoring windows rank, rank + world_size, ...

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters inside each one), so a rank
    with fewer windows scores a placeholder window with weight 0.
    """
    dist, B = run.dist, run.batch.micro_batch_size
    mine = run.val_starts[dist.rank :: dist.world_size]
    n_batches = math.ceil(math.ceil(len(run.val_starts) / dist.world_size) / B)
    run.engine.eval()
    loss_sum, tokens = 0.0, 0
    for b in range(n_batches):
        starts, weight = mine[b * B : (b + 1) * B], 1.0
        if len(starts) == 0:
            starts, weight = run.val_starts[:1], 0.0
        x, y = window_batch(run.val_tokens, starts, run.batch.block_size, dist.device)
        loss_sum += weight * lm_loss(run.engine, x, y, reduction="sum").item()
        tokens += int(weight) * y.numel()
    run.engine.train()
    loss_sum, tokens = ds.all_reduce_sum([loss_sum, tokens], dist.device)
    return loss_sum / tokens
