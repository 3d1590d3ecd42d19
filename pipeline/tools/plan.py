"""`gptpipe plan`: what a training run of params.yaml will cost before it starts: parameters, tokens, FLOPs and the
memory of each process, against what this machine has; with a probe (a short real run), its speed and an ETA.
The parameters and the memory of the training state are tools/estimate.py's model (doctor's too); on a CPU the process
itself is measured here (Python, torch, transformers and DeepSpeed loaded; on a GPU the CUDA context is outside what
torch allocates and is not counted). The ETA replays training's own cadence (train/cadence.py) over the run's steps.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config.all import Params
from pipeline.config.train import TrainConfig
from pipeline.errors import UserError
from pipeline.files import parse_json
from pipeline.layout import TrainMetrics
from pipeline.output import Echo, silent
from pipeline.tools.child_process import SigtermUnwinds, run_to_end
from pipeline.tools.estimate import Shape, checkpoint_bytes, estimated_shape, memory_per_process, tokenized
from pipeline.train.cadence import Cadence

GB = 1e9


@dataclass
class Plan:
    processes: int
    per_node: int
    tokens_per_step: int
    steps: int | None
    shape: Shape
    memory: dict[str, float]  # bytes per process, by part (device memory)
    cpu_offloaded: float  # bytes per process moved to CPU memory by offload
    checkpoint: float  # bytes one checkpoint takes on disk, every process's files together
    available: float | None  # bytes a process may use on this machine
    available_source: str
    notes: list[str] = field(default_factory=list)
    target_steps: int | None = None  # the steps the last run took to reach train.target_loss (steps_to_target)
    target_basis: str = ""

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def total_tokens(self) -> int | None:
        return self.steps * self.tokens_per_step if self.steps is not None else None


def world_of(p: Params, processes: int | None) -> tuple[int, int]:
    """(processes in all, processes per machine) the run will have: --processes, else what the launcher settings say."""
    import torch

    t = p.train
    if processes is not None:
        if processes < 1:
            raise UserError(f"--processes {processes}: plan for at least 1 process")
        return processes, processes
    if t.launcher == "python":
        return 1, 1
    per_node = t.num_gpus or torch.cuda.device_count() or 1
    nodes = t.num_nodes or 1
    if t.hostfile and not t.num_nodes:
        from pipeline.infra.launcher import parse_hostfile

        hosts = parse_hostfile(t.hostfile)
        nodes = len(hosts)
        per_node = t.num_gpus or min(slots for _, slots in hosts)
    return nodes * per_node, per_node


def runtime_bytes() -> float:
    """This process's resident memory once torch, transformers and DeepSpeed are loaded: what a training process
    holds before its model (on a CPU; a GPU's CUDA context is outside torch's allocations)."""
    import psutil

    from pipeline.infra.deepspeed import accelerator

    accelerator()  # DeepSpeed loaded for its memory, as training loads it (told it is on a CPU, as training tells it)

    return float(psutil.Process().memory_info().rss)


def machine_memory(per_node: int) -> tuple[float | None, str]:
    """Memory one process may use: a GPU's total, or this machine's available memory shared by its processes."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return float(total), f"{torch.cuda.get_device_name()} ({total / GB:,.1f} GB)"
    import psutil

    available = psutil.virtual_memory().available
    return available / per_node, f"this machine's available memory ({available / GB:,.1f} GB)" + (f" over {per_node} processes" if per_node > 1 else "")


def resolved_engine(p: Params, batch) -> dict:
    """The engine config the run will train with (train.* and train.deepspeed_config resolved into one, as the loop
    does): a JSON contradicting the params is the same one message here as in train, before any estimate."""
    from pipeline.infra.deepspeed import deepspeed_config, resolve_user_config

    return resolve_user_config(p.train, deepspeed_config(p.train, batch), p.train.deepspeed_config)[0]


def make_plan(p: Params, processes: int | None = None) -> Plan:
    import torch

    world, per_node = world_of(p, processes)
    meta = tokenized(p)
    target_steps, target_basis = steps_to_target(p)  # read before a probe spends its time
    shape, note = estimated_shape(p, meta)
    batch = p.train.batch(world, p.model.block_size)
    resolved_engine(p, batch)
    steps = p.train.max_steps
    notes = [note] if note else []
    if steps is None:
        if meta is not None:
            tokens = meta.get("splits", {}).get("train", {}).get("tokens")
            if tokens:
                steps = p.train.total_steps(max(1, tokens // batch.block_size), batch)
        if steps is None:
            notes.append("train.epochs: the steps are known once the data is tokenized")
    memory, offloaded = memory_per_process(p, shape, world)
    if not torch.cuda.is_available():
        memory["runtime"] = runtime_bytes()
    available, source = machine_memory(per_node)
    return Plan(processes=world, per_node=per_node, tokens_per_step=batch.tokens_per_step, steps=steps, shape=shape,
                memory=memory, cpu_offloaded=offloaded, checkpoint=checkpoint_bytes(p, shape), available=available,
                available_source=source, notes=notes, target_steps=target_steps, target_basis=target_basis)


def fix_for(plan: Plan, p: Params) -> str:
    """The knob that frees the most where the memory goes, in one phrase."""
    t, m = p.train, plan.memory
    if m["activations"] >= max(m["weights"] + m["gradients"], m["optimizer state"]) and not t.activation_checkpointing:
        return "set train.activation_checkpointing=true, or a smaller train.micro_batch_size with train.grad_accum to keep the batch"
    if plan.processes > 1 and t.zero_stage < 3:
        return f"raise train.zero_stage (now {t.zero_stage}) to split more of the state over the {plan.processes} processes"
    if t.zero_stage > 0 and not t.offload_optimizer:
        return "set train.offload_optimizer=true (optimizer state in CPU memory)"
    if t.precision == "fp32":
        return "train in bf16 (train.precision=bf16) or on more processes with ZeRO"
    return "use more processes with ZeRO 3, or a smaller model"


@dataclass
class Probe:
    steps: int
    seconds_per_step: float  # the median step after the first (which holds one-time work)
    wall_s: float  # the probe process, imports and all
    seconds: dict[str, float]  # setup, train, eval, save, export as the run measured them
    peak_memory: float  # bytes: the training process at its largest (resident on a CPU, allocated on a GPU)


def run_probe(p: Params, project: Path, steps: int, echo: Echo = silent) -> Probe:
    """A real run of `steps` optimizer steps through `python -m pipeline.train` (the launcher too, when params say
    deepspeed) with its outputs in a scratch folder that is deleted after, on SIGTERM too: the project's own folders
    are untouched."""
    import time

    with SigtermUnwinds() as sigterm, tempfile.TemporaryDirectory(prefix="gptpipe-probe-") as scratch:
        root = Path(scratch)
        dumped = p.model_dump(mode="json")
        dumped["train"].update(probe_overrides(p.train, steps, root))
        (root / "params.yaml").write_text(yaml.safe_dump(dumped, sort_keys=False))
        echo(f"plan: probing {steps} steps (python -m pipeline.train, outputs in {root})")
        start = time.perf_counter()
        # Run from the project, so relative paths (the tokens, a hostfile, a DeepSpeed JSON) mean what they mean there.
        proc = run_to_end([sys.executable, "-m", "pipeline.train", "--params", str(root / "params.yaml")], project, sigterm)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-6:])
            raise UserError(f"plan --probe: the probe run stopped (exit {proc.returncode}):\n{tail}")
        metrics = json.loads((root / "metrics" / "metrics.json").read_text())
        ms = [v for _, v in TrainMetrics(root / "metrics").read_curves()["train/ms_per_step"]]
    return Probe(steps=steps, seconds_per_step=statistics.median(ms[1:] or ms) / 1000, wall_s=wall,
                 seconds=metrics["time"], peak_memory=float(metrics["peak_memory_bytes"]))


def switched_off(t: type[TrainConfig], name: str) -> object:
    """The value that turns a cadence field off: null, false or 0, the first its schema accepts."""
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    f = t.model_fields[name]
    adapter = TypeAdapter(Annotated[f.annotation, f])
    for value in (None, False, 0):
        try:
            adapter.validate_python(value, strict=True)  # strict: False is no 0 for an int, nor 0 for a bool
            return value
        except ValidationError:
            continue
    raise AssertionError(f"train.{name} is marked as a cadence field but takes none of null, false and 0: plan's probe "
                         "cannot switch it off (set it in probe_overrides)")


def probe_overrides(t: TrainConfig, steps: int, root: Path) -> dict:
    """The train.* keys a probe of `steps` steps runs with: every cadence field the schema marks switched off, so a new
    interval cannot run inside the probe, but for the cadence the probe times: a log line each step (its step times),
    one evaluation and one save at its end, none at its start (what the ETA multiplies); and a short fresh run in
    the scratch folder `root`, with no early stop or target."""
    timed = {"log_interval": 1, "eval_interval": steps, "save_interval": steps, "eval_at_start": False}
    off = {name: switched_off(type(t), name) for name in type(t).cadence_keys() if name not in timed}
    return {**off, **timed, "max_steps": steps, "epochs": None, "warmup_steps": min(t.warmup_steps, steps), "decay_steps": None,
            "early_stopping_patience": None, "target_loss": None, "stop_at_target": False, "resume": "never",
            "run_name": None, "out_dir": str(root / "checkpoints"), "export_dir": str(root / "export"),
            "metrics_dir": str(root / "metrics"), "keep_last": 1, "loggers": ["dvclive"]}


@dataclass
class Events:
    """What a run does after its steps, as training's cadence decides it."""

    evals: int = 0
    hellaswag: int = 0
    samples: int = 0
    saves: int = 0


def events(t: TrainConfig, steps: int) -> Events:
    """Training's own Cadence stepped through a run of `steps` steps, counted as the loop acts on it: an evaluation
    before the first step with eval_at_start, and with export: best every evaluation taken as an improvement, which
    saves (the upper end: early on nearly every evaluation improves). Early stopping is not foreseen."""
    cadence = Cadence(t, steps)
    counted = Events(evals=1 if t.eval_at_start else 0)
    for step in range(1, steps + 1):
        due = cadence.after(step)
        counted.evals += due.eval
        counted.hellaswag += due.hellaswag
        counted.samples += due.sample
        counted.saves += due.save or (due.eval and t.export == "best")
    return counted


def eta(p: Params, steps: int, probe: Probe) -> float:
    """Seconds a run of `steps` will take, from the probe: its whole process, then the steps, evaluations and saves
    the probe did not do, each as long as the probe's (HellaSwag and samples, which the probe does not run, are left
    out: plan_rows says how many)."""
    counted = events(p.train, steps)
    return (probe.wall_s + (steps - probe.steps) * probe.seconds_per_step
            + (counted.evals - 1) * probe.seconds.get("eval", 0.0) + (counted.saves - 1) * probe.seconds.get("save", 0.0))


def steps_to_target(p: Params) -> tuple[int | None, str]:
    """The steps the last run in train.metrics_dir took to reach train.target_loss, and what that figure rests on;
    a damaged metrics.json is one message naming it and the key."""
    if p.train.target_loss is None:
        return None, ""
    path = TrainMetrics(p.train.metrics_dir).summary
    target = last_target(path) if path.is_file() else None
    if target and target.get("loss") == p.train.target_loss and target.get("reached") is True:
        step = target.get("step")
        if type(step) is not int or step < 1:
            raise UserError(f"{path}: `target.step` is {step!r}, not a step; the file is damaged: rerun the train stage")
        return step, f"the last run in {p.train.metrics_dir} reached it at step {step}"
    return None, f"no run in {p.train.metrics_dir} has reached {p.train.target_loss} yet: the whole run's ETA bounds it"


def last_target(path: Path) -> dict | None:
    """The "target" record of a training run's metrics.json (None: the run had no target)."""
    try:
        summary = parse_json(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); the file is damaged: rerun the train stage") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path}: not a training run's metrics.json (a JSON object); the file is damaged: rerun the train stage")
    target = summary.get("target")
    if target is not None and not isinstance(target, dict):
        raise UserError(f"{path}: `target` is {json.dumps(target)[:40]}, not the record of train.target_loss; the file is "
                        "damaged: rerun the train stage")
    return target


def size(n: float) -> str:
    return f"{n / GB:,.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:,.1f} MB"


def duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m {s:02d}s" if hours else (f"{m}m {s:02d}s" if m else f"{seconds:.1f} s")


def plan_rows(p: Params, plan: Plan, probe: Probe | None) -> tuple[dict[str, str], str | None]:
    """The table `gptpipe plan` prints, and the one-line warning when the run will not fit."""
    s, t = plan.shape, p.train
    muon = f" (Muon on {s.n_hidden:,} in the hidden matrices)" if t.optimizer == "muon" else ""
    rows = {
        "model": f"{s.arch}, {s.n_layer} layers x {s.n_embd}, vocabulary {s.vocab:,}, context {p.model.block_size}",
        "parameters": f"{s.n_params:,}{muon}",
        "processes": f"{plan.processes}" + (f" ({plan.per_node} per machine)" if plan.per_node != plan.processes else ""),
        "tokens per step": f"{plan.tokens_per_step:,}",
        "steps": f"{plan.steps:,} = {plan.total_tokens:,} tokens" if plan.steps is not None else "unknown (train.epochs, not tokenized yet)",
        "model FLOPs": f"{s.flops_per_token:,.4g} per token" + (f", {s.flops_per_token * plan.total_tokens:,.4g} for the run" if plan.total_tokens else ""),
    }
    rows.update({f"memory: {part}": size(b) for part, b in plan.memory.items()})
    rows["memory per process"] = f"{size(plan.total_memory)} estimated, of {size(plan.available)}: {plan.available_source}" if plan.available else size(plan.total_memory)
    if plan.cpu_offloaded:
        rows["offloaded to CPU"] = f"{size(plan.cpu_offloaded)} per process"
    rows["checkpoint"] = f"{size(plan.checkpoint)} on disk (weights and optimizer state), {t.keep_last} kept plus the best"
    for note in plan.notes:
        rows.setdefault("note", note)
    warning = None
    if plan.available and plan.total_memory > plan.available:
        warning = f"will not fit: {size(plan.total_memory)} per process against {size(plan.available)}; {fix_for(plan, p)}"
    if probe:
        tokens_per_s = plan.tokens_per_step / probe.seconds_per_step
        rows["probe"] = f"{probe.steps} steps in {probe.wall_s:.1f} s (setup {probe.seconds.get('setup', 0):.1f} s)"
        rows["step time"] = f"{probe.seconds_per_step * 1000:,.1f} ms = {tokens_per_s:,.0f} tokens/s"
        rows["peak memory (probe)"] = f"{size(probe.peak_memory)} measured; the estimate {plan.total_memory / probe.peak_memory:.2f}x of it"
        if plan.steps is not None:
            counted = events(t, plan.steps)
            untimed = [f"{n:,} {what}" for n, what in ((counted.hellaswag, "HellaSwag scorings"), (counted.samples, "sample rounds")) if n]
            rows["ETA"] = (f"{duration(eta(p, plan.steps, probe))} for {plan.steps:,} steps, {counted.evals:,} evaluations and"
                           f" {counted.saves:,} saves included" + (f"; {' and '.join(untimed)} not (the probe runs none)" if untimed else ""))
        if t.target_loss is not None:
            steps, basis = plan.target_steps, plan.target_basis
            rows["ETA to the target"] = (f"{duration(eta(p, steps, probe))} ({basis})" if steps else basis)
    return rows, warning
