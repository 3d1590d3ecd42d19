"""The training loop: `setup` builds the run, `fit` trains it, `train` does both and exports the model."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.checkpoints.elastic import prepare_elastic_resume
from pipeline.checkpoints.folder import copy_metrics, latest_tag, load_checkpoint, save_checkpoint, verify_checkpoint
from pipeline.checkpoints.run import open_run, run_identity, start_run, why_fresh
from pipeline.checkpoints.state import TrainState
from pipeline.config.all import Params
from pipeline.config.train import Batch
from pipeline.errors import UserError
from pipeline.eval.hellaswag import Item, hellaswag_scores, load_hellaswag
from pipeline.eval.lm import attention_of, lm_forward, window_sums
from pipeline.infra.deepspeed import (
    build_engine,
    check_precision,
    engine_config,
    model_init,
    optimizer_step,
    read_user_config,
    set_lr,
    training_corrections,
)
from pipeline.infra.distributed import Dist, all_reduce_sum, broadcast, collective_failure, init_distributed, unresponsive_ranks
from pipeline.infra.hardware import Peak, peak, peak_memory, use_tf32
from pipeline.layout import RunDir, TokensDir, TrainMetrics, step_tag
from pipeline.model.build import (
    attention_kernel,
    build_model,
    check_fits_in_memory,
    check_vocabulary,
    count_params,
    export_dtype,
    flops_per_token,
    scratch_config,
)
from pipeline.model.generate import sample_tokens
from pipeline.output import Echo, ProgressFactory, no_progress, silent
from pipeline.tokenize.tokenizers import Tokenizer, load_tokenizer
from pipeline.tokens import first_position, open_split, read_meta
from pipeline.train.batches import MicroBatches, WindowSampler, fixed_windows, full_windows
from pipeline.train.cadence import Cadence, EarlyStopping, Throughput, TimeToTarget, seconds_since_process_start
from pipeline.train.export import export_model
from pipeline.train.metrics_log import MetricsLog
from pipeline.train.optimizer import describe_optimizer, param_groups
from pipeline.train.schedules import decay_end, lr_at


@dataclass
class Run:
    p: Params
    dist: Dist
    engine: object
    tokenizer: Tokenizer
    batch: Batch
    total_steps: int
    train_data: WindowSampler
    val_tokens: np.ndarray
    val_starts: np.ndarray  # the fixed val windows, the same for every world size
    hellaswag: list[Item]
    run_dir: RunDir
    n_params: int
    flops_per_token: float
    peak: Peak | None  # what MFU is against, per process (rank 0; None elsewhere)
    export_dtype: torch.dtype
    log: MetricsLog
    document_eot: int | None = None  # train.document_mask: the end-of-text id positions restart after
    state: TrainState = field(default_factory=TrainState)
    stop_reason: str | None = None
    seconds: dict = field(default_factory=lambda: defaultdict(float))  # wall time by phase


def train(p: Params, progress: ProgressFactory = no_progress, echo: Echo = print, dist: Dist | None = None) -> dict | None:
    """Train (resuming when a compatible checkpoint exists) and export; the summary on rank 0, else None."""
    start = time.perf_counter()
    dist = dist or init_distributed(timeout_s=p.train.collective_timeout)
    run = None
    try:
        with ExitStack() as hold:  # train.out_dir's lock and the run's DeepSpeed corrections, from setup to the export
            run = setup(p, dist, echo if dist.is_main else silent, hold)
            run.seconds["setup"] = time.perf_counter() - start
            fit(run, progress)
            with timed(run, "export"):
                exported = export_run(run)
    except RuntimeError as e:
        failure = collective_error(e, p, dist, run)  # another process froze or died: one message
        if failure is None:
            raise
        raise failure from None
    run.seconds["total"] = time.perf_counter() - start
    stopped = run.stop_reason or ("epochs" if p.train.epochs else "max_steps")
    peak_info = {"mfu_peak_tflops": run.peak.tflops} if run.peak else {}
    target = TimeToTarget(p.train)
    target_info = {"target": target.summary(run.state)} if p.train.target_loss is not None else {}
    memory = peak_memory(dist.device)
    run.log.finish({"time": {k: round(v, 3) for k, v in run.seconds.items()}, "stopped": stopped, "peak_memory_bytes": memory,
                    **peak_info, **target_info})
    run.log.close()
    if not dist.is_main:
        return None
    s = run.state
    return {
        "run": str(run.run_dir.root),
        "steps": s.step,
        "tokens seen": s.tokens_seen,
        "parameters": run.n_params,
        "val loss": s.val_loss,
        "best val loss": s.best_val_loss,
        "stopped": run.stop_reason or (f"after train.epochs={p.train.epochs:g} ({run.total_steps} steps)" if p.train.epochs
                                       else f"at train.max_steps ({run.total_steps})"),
        "exported": f"{exported['which']} ({exported['tag']}, val loss {exported['val_loss']:.4f}) to {p.train.export_dir}",
        **{f"seconds {phase}": round(seconds, 1) for phase, seconds in run.seconds.items()},
        "peak memory": f"{memory / 1e9:,.2f} GB " + ("allocated on the GPU" if dist.device.type == "cuda" else "resident"),
        **({"MFU against": f"{run.peak.tflops:,.4g} TFLOP/s per process: {run.peak.source}"} if run.peak else {}),
        **({"target": target.describe(s)} if p.train.target_loss is not None else {}),
    }


def setup(p: Params, dist: Dist, echo: Echo = silent, hold: ExitStack | None = None) -> Run:
    """Everything the loop needs, checked before any folder is touched; hold receives train.out_dir's lock
    (rank 0) and the DeepSpeed corrections the whole run needs, released and undone when the caller closes it
    (without one, when the process ends)."""
    t, tokens = p.train, TokensDir(p.tokenize.out_dir)
    hold = hold if hold is not None else ExitStack()
    hold.enter_context(training_corrections(t))  # DeepSpeed's corrections that hold for the whole run, left with hold
    check_precision(t)  # before any folder is made or moved
    attention = attention_kernel(t.attention, t.document_mask, t.precision)
    use_tf32(t.tf32)
    # Checked now, not after hours of training: the tokens against their CRC and vocabulary, the tokenizer's presence.
    meta = read_meta(tokens.root)
    train_tokens, val_tokens = (open_split(tokens, split, meta) for split in ("train", "val"))
    tokenizer = load_tokenizer(tokens.tokenizer)
    if t.document_mask and first_position(train_tokens, tokenizer.eot_id) is None:
        raise UserError(f"train.document_mask: the train split of {tokens.root} holds no end-of-text id ({tokenizer.eot_id}), "
                        "so there is no document boundary to mask at and the mask would change nothing (nanoGPT's data, "
                        "imported, is one stream): set train.document_mask: false, or tokenize the text as documents")
    hellaswag = load_hellaswag(p, t.hellaswag_limit) if t.hellaswag_interval else []
    batch = t.batch(dist.world_size, p.model.block_size)
    total_steps = t.total_steps(full_windows(train_tokens.tokens, batch.block_size), batch)

    # The data a run learns from, by content: re-tokenizing identical text keeps the run resumable.
    data = {"vocab_size": meta["vocab_size"], "eot_id": meta["eot_id"], "train_crc32": train_tokens.crc32, "val_crc32": val_tokens.crc32}
    # The engine's config first: a DeepSpeed JSON that contradicts the params stops the run before any folder moves.
    ds_config = engine_config(t, batch, echo)
    identity = run_identity(p, data, batch, read_user_config(t.deepspeed_config) if t.deepspeed_config else None)
    inputs = {} if p.model.is_scratch else {"model.init": p.model.init}  # never moved aside by train.resume=never
    run_dir, tag = open_run(t, identity, dist, echo, hold, inputs)
    reason = why_fresh(t.out_dir, identity) if tag is None and not t.run_name else None
    echo(f"train: resuming {run_dir.root}/{tag}" if tag else f"train: starting fresh in {run_dir.root}" + (f": {reason}" if reason else ""))
    if p.model.trust_remote_code:
        echo(f"train: model.trust_remote_code is on: running the modelling code that ships with {p.model.init}")
    # A checkpoint of another number of processes: converted to DeepSpeed's universal format first when needed.
    universal = prepare_elastic_resume(run_dir, tag, dist, echo, t.collective_timeout, t.optimizer) if tag else None

    if p.model.is_scratch:
        check_fits_in_memory(scratch_config(p.model, meta["vocab_size"], meta["eot_id"]), dist.world_size if t.zero_stage == 3 else 1)
    torch.manual_seed(t.seed)  # the same seed on every rank gives every rank the same initial weights
    with model_init(ds_config, t.collective_timeout) if p.model.is_scratch else nullcontext():  # ZeRO-3: each rank builds its partition only
        model = build_model(p.model, meta["vocab_size"], meta["eot_id"], t.precision, t.activation_checkpointing,
                            shards=dist.world_size if t.zero_stage == 3 else 1, attention=attention)
    check_vocabulary(model, p.model.init, tokenizer)
    n_params = count_params(model)
    engine = build_engine(model, t, ds_config, param_groups(model, t))
    start_run(run_dir, identity, ds_config, dist)
    state = load_checkpoint(engine, run_dir, tag, dist, universal).loop_state() if tag else TrainState()
    if not tag:
        torch.manual_seed(t.seed + dist.rank)  # dropout differs across ranks, like their data
    elif dist.is_main and run_dir.step(tag).metrics.is_dir():
        copy_metrics(TrainMetrics(run_dir.step(tag).metrics), TrainMetrics(t.metrics_dir))
    state.decay_end, note = decay_end(t, total_steps, state.decay_end)
    mfu_peak = peak(t, dist.device) if dist.is_main else None  # a calibration, once per machine: on one rank, not all at once
    echo(describe_run(p, batch, total_steps, n_params, run_dir, attention_of(model)) + (f"\ntrain: {note}" if note else ""))
    if mfu_peak:
        echo(f"train: MFU      against {mfu_peak.tflops:,.4g} TFLOP/s per process: {mfu_peak.source}")

    return Run(
        p=p, dist=dist, engine=engine, tokenizer=tokenizer, batch=batch, total_steps=total_steps,
        train_data=WindowSampler(train_tokens.tokens, batch=batch, seed=t.seed, rank=dist.rank),
        val_tokens=val_tokens.tokens,
        val_starts=fixed_windows(val_tokens.tokens, batch.block_size, t.eval_windows, seed=t.seed + 1),
        hellaswag=hellaswag, run_dir=run_dir, n_params=n_params, document_eot=tokenizer.eot_id if t.document_mask else None,
        flops_per_token=flops_per_token(model, n_params, batch.block_size),
        peak=mfu_peak,
        export_dtype=export_dtype(t.export_dtype, p.model),
        log=MetricsLog(t, dist.is_main, resume=tag is not None, echo=echo, run_name=run_dir.root.name, config=p.model_dump(mode="json"),
                       run_root=run_dir.root, start_step=state.step),
        state=state,
    )  # fmt: skip


def describe_run(p: Params, batch: Batch, total_steps: int, n_params: int, run_dir: RunDir, attention: str = "sdpa") -> str:
    """The resolved configuration, one compact block at the start of the log."""
    m, t = p.model, p.train
    model = f"{m.init} (fine-tune)" if not m.is_scratch else f"{m.arch} {m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads"
    length = f"{total_steps:,} steps" + (f" ({t.epochs:g} epochs)" if t.epochs is not None else "")
    schedule = "constant" if t.schedule == "constant" else f"{t.schedule} to {t.final_lr:.2e}"
    return "\n".join([
        f"train: model     {model}, context {m.block_size}, {n_params:,} parameters",
        f"train: batch     {batch.micro_batch_size} x {batch.grad_accum} accumulation x {batch.world_size} processes"
        f" = {batch.global_size:,} sequences = {batch.tokens_per_step:,} tokens per step"
        + (", attention inside each document (train.document_mask)" if t.document_mask else ""),
        f"train: length    {length}, {total_steps * batch.tokens_per_step:,} tokens",
        f"train: optimizer {describe_optimizer(t)}, warmup {t.warmup_steps}, {schedule}, clip {t.clip or 'off'}",
        f"train: engine    {t.precision}, ZeRO {t.zero_stage}, attention {attention}, export {t.export} to {t.export_dir}, checkpoints in {run_dir.root}",
    ])  # fmt: skip


def fit(run: Run, progress: ProgressFactory = no_progress) -> None:
    """The loop: an optimizer step, then whatever the cadence says is due after it, until the last step or an early stop."""
    t, s = run.p.train, run.state
    cadence, stopping, throughput = Cadence(t, run.total_steps), EarlyStopping(t), Throughput(run.batch.tokens_per_step)
    target = TimeToTarget(t)
    run.engine.train()
    changed = target.resume(s, run.flops_per_token)
    if changed:
        run.log.echo(f"train: {changed}")
    run.stop_reason = stopping.reason(s) or target.reason(s)  # stopped before this resume: nothing more to do
    if run.stop_reason:
        return
    if t.eval_at_start and s.step == 0:
        with timed(run, "eval"):
            run.log.val(0, 0, estimate_val_loss(run), math.inf, along(run))  # the starting point; not a candidate for the best
    run.log.start(s.step, run.total_steps, progress)
    batches = MicroBatches(run.train_data, run.batch.grad_accum, s.step, run.dist.device)
    while s.step < run.total_steps:
        # Token accuracy needs an argmax over the vocabulary: measured on the steps that log it only.
        loss, accuracy, lr, grad_norm, seconds = train_step(run, batches, cadence.after(s.step + 1).log)
        s.step, s.tokens_seen = s.step + 1, s.tokens_seen + run.batch.tokens_per_step
        s.train_seconds += seconds
        run.seconds["train"] += seconds
        throughput.add(seconds)
        due = cadence.after(s.step)

        if due.log:
            tokens_per_s, ms_per_step = throughput.read()
            run.log.train(s.step, s.tokens_seen, loss, accuracy, lr, grad_norm, tokens_per_s, ms_per_step, model_flops_utilisation(run, tokens_per_s))
        save = due.save
        if due.eval:
            with timed(run, "eval"):
                improved = stopping.record(s, estimate_val_loss(run))
            run.log.val(s.step, s.tokens_seen, s.val_loss, s.best_val_loss, along(run))
            save = save or (improved and t.export == "best")  # the best weights must be on disk to be exported, as nanoGPT does
            if target.record(s, run.flops_per_token, seconds_since_process_start()):
                run.log.echo(f"train: {target.describe(s)}")
            run.stop_reason = stopping.reason(s) or target.reason(s)
        if due.hellaswag:
            with timed(run, "eval"):
                run.log.hellaswag(s.step, s.tokens_seen, score_hellaswag(run))
        if due.sample:
            with timed(run, "eval"):
                run.log.samples(s.step, training_samples(run))
        if save or run.stop_reason:
            with timed(run, "save"):
                save_run(run)
        run.log.advance()
        if run.stop_reason:
            run.log.echo(f"train: {run.stop_reason}")
            break


def along(run: Run) -> dict:
    """Where an evaluation stands besides its step: training seconds so far (over every resume) and model FLOPs,
    logged with each val loss so the report and `dvc plots` draw val loss against wall time and compute."""
    return {"val/train_seconds": round(run.state.train_seconds, 3), "val/flops": run.state.tokens_seen * run.flops_per_token}


def model_flops_utilisation(run: Run, tokens_per_s: float) -> float | None:
    """Model FLOP/s over the peak of every process. A rate past a measured peak means the calibration ran on a busy
    machine: the peak is raised to what this run showed the machine can do (said once), so MFU never passes 100%."""
    if run.peak is None:
        return None
    achieved = tokens_per_s * run.flops_per_token / run.dist.world_size / 1e12  # TFLOP/s per process
    if achieved > run.peak.tflops and run.peak.source != "train.peak_tflops":
        run.log.echo(f"train: this run does {achieved:,.4g} TFLOP/s per process, above the measured peak {run.peak.tflops:,.4g}"
                     " (measured while the machine was busy?): MFU is against this rate from here on")
        run.peak = Peak(achieved, f"the rate this run reached (the calibration said {run.peak.tflops:,.4g})")
    return achieved / run.peak.tflops


def train_step(run: Run, batches: MicroBatches, accuracy: bool = False) -> tuple[float, float | None, float, float | None, float]:
    """One optimizer step over grad_accum micro batches: (mean loss over every process, token accuracy when asked
    for, else None, lr, gradient norm, seconds)."""
    t, engine, batch, dist, s = run.p.train, run.engine, run.batch, run.dist, run.state
    start = time.perf_counter()
    lr = lr_at(s.step, t, s.decay_end)
    set_lr(engine, lr)
    losses, correct, grad_norm = [], [], None
    for micro in range(batch.grad_accum):
        x, y = batches.current
        loss, hits = lm_loss(engine, x, y, count_correct=accuracy, eot_id=run.document_eot)
        batches.advance()  # the next micro batch is made while a GPU still runs this forward pass
        engine.backward(loss)
        grad_norm = optimizer_step(engine, boundary=micro == batch.grad_accum - 1, grad_clip=t.clip)
        losses.append(loss.detach())
        correct.append(hits)
    loss_sum = sum(loss.item() for loss in losses)  # read once the step is done: no wait inside it
    hits_sum = sum(int(h) for h in correct) if accuracy else 0
    loss_total, hits_total = all_reduce_sum([loss_sum, hits_sum], dist.device)
    train_loss = loss_total / (batch.grad_accum * batch.world_size)
    token_accuracy = hits_total / (batch.grad_accum * batch.world_size * batch.micro_batch_size * batch.block_size) if accuracy else None
    if not math.isfinite(train_loss):
        latest = latest_tag(run.run_dir)
        raise UserError(
            f"train: the loss is {train_loss} at step {s.step + 1}; stopped without saving. The last good checkpoint is"
            f" {run.run_dir.root / latest if latest else 'none'}. Lower train.lr, raise train.warmup_steps or use train.precision=fp32/bf16."
        )
    return train_loss, token_accuracy, lr, grad_norm, time.perf_counter() - start


def save_run(run: Run) -> None:
    """A checkpoint of the run as it stands, with the training curves so far."""
    t, s = run.p.train, run.state
    run.log.write_summary()
    saved = s.saved_as(step_tag(s.step), run.dist.world_size, run.p.model_dump())
    save_checkpoint(run.engine, run.run_dir, saved, run.dist, t.keep_last, run.tokenizer, TrainMetrics(t.metrics_dir))


@contextmanager
def timed(run: Run, phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        run.seconds[phase] += time.perf_counter() - start


def collective_error(e: RuntimeError, p: Params, dist: Dist, run: Run | None) -> UserError | None:
    """One message for a collective that failed because another process froze or died, else None.

    The processes still alive say so through the rendezvous store, so the message names the ones that did not.
    """
    cause = collective_failure(e)
    if cause is None:
        return None
    t = p.train
    missing = unresponsive_ranks(dist, wait_s=min(30, t.collective_timeout))
    who = f"rank {', '.join(map(str, missing))}" if missing else "another process"
    why = (f"{who} did not answer for more than train.collective_timeout={t.collective_timeout} s: it is frozen (stopped, or stuck"
           " in I/O)" if cause == "frozen" else f"{who} ended (see its log)")
    where = f"at step {run.state.step + 1}" if run is not None else "while setting up"
    latest = latest_tag(run.run_dir) if run is not None else None
    resume = f"; a rerun resumes from {run.run_dir.root / latest}" if latest else ""
    return UserError(f"train: {why}, {where} (seen by rank {dist.rank}){resume}")


def lm_loss(model, x: torch.Tensor, y: torch.Tensor, count_correct: bool = False,
            eot_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean next-token cross-entropy, the number of argmax predictions equal to the target when count_correct);
    x, y are (B, T) inputs and targets shifted by one; eot_id: attention inside each document (train.document_mask)."""
    logits = lm_forward(model, x, eot_id).logits  # (B, T, V)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
    return loss, ((logits.detach().argmax(-1) == y).sum() if count_correct else None)


def estimate_val_loss(run: Run) -> float:
    """Mean val loss over the fixed val windows, the same for every world size, split over the ranks."""
    dist = run.dist
    run.engine.eval()
    sums = window_sums(run.engine, run.val_tokens, run.val_starts, run.batch.block_size, run.p.train.eval_batch_size or run.batch.micro_batch_size,
                       dist.rank, dist.world_size, count_correct=False, eot_id=run.document_eot)
    run.engine.train()
    loss_sum, tokens = all_reduce_sum([sums.loss, sums.tokens], dist.device)
    return loss_sum / tokens


def score_hellaswag(run: Run) -> dict:
    """HellaSwag acc and acc_norm of the model now, the items split over the ranks."""
    run.engine.eval()
    scores = hellaswag_scores(run.engine, run.tokenizer, run.hellaswag, run.p.train.eval_batch_size or run.batch.micro_batch_size,
                              dist=run.dist if run.dist.world_size > 1 else None, max_len=run.batch.block_size)
    run.engine.train()
    return scores


def training_samples(run: Run) -> list[tuple[str, str]]:
    """(prompt, text) for each of train.sample_prompts, top-k 50 with a fixed seed, so the steps compare.

    Every rank generates (ZeRO-3 needs all of them in each forward pass); the same seed gives each the same text.
    """
    t, tok = run.p.train, run.tokenizer
    generator = torch.Generator().manual_seed(t.seed)
    run.engine.eval()
    out = []
    for prompt in t.sample_prompts:
        ids = sample_tokens(run.engine.module, tok.encode_prompt(prompt), t.sample_max_new_tokens, temperature=1.0, top_k=50,
                            top_p=1.0, generator=generator, eot_id=tok.eot_id, stop_at_eot=True, vocab_size=tok.vocab_size)
        out.append((prompt, tok.decode(ids)))
    run.engine.train()
    return out


def export_run(run: Run) -> dict:
    """Export the best checkpoint's weights (train.export: best) or the last ones; what was exported."""
    t, s = run.p.train, run.state
    which, tag, val_loss = "last", step_tag(s.step), s.val_loss
    if t.export == "best" and s.best_tag == tag:
        which = "best"  # the last step is the best
    elif t.export == "best" and s.best_tag:
        problem = verify_checkpoint(run.run_dir.step(s.best_tag)) if run.dist.is_main else None
        problem = broadcast(problem) if run.dist.world_size > 1 else problem
        if problem is None:
            which, tag, val_loss = "best", s.best_tag, s.best_val_loss
            # The best weights (and their fp32 masters) into the engine; saved by another number of processes, converted.
            universal = prepare_elastic_resume(run.run_dir, tag, run.dist, run.log.echo, t.collective_timeout)
            load_checkpoint(run.engine, run.run_dir, tag, run.dist, universal)
        else:  # e.g. train.export switched to best on a resume, when improvements were not being saved
            run.log.echo(f"train: exporting the last weights: the best checkpoint {s.best_tag} cannot be used ({problem})")
    info = {"exported": which, "step": int(tag.removeprefix("step-")), "tag": tag, "val_loss": val_loss, "tokens_seen": s.tokens_seen}
    export_model(run.engine, run.p, info, run.dist, run.tokenizer, run.export_dtype)
    return {"which": which, "tag": tag, "val_loss": val_loss if val_loss is not None else math.nan}
