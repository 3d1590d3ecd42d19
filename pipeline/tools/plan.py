"""`gptpipe plan`: what a training run of params.yaml will cost before it starts: parameters, tokens, FLOPs and the
memory of each process, against what this machine has; with a probe (a short real run), its speed and an ETA.

The memory estimate counts what DeepSpeed and transformers hold for one process:
- weights, gradients and optimizer state: fp32 training keeps 4 + 4 bytes a parameter and AdamW's two moments
  (8 bytes; Muon's one momentum, 4, on its matrices); bf16/fp16 keep 2 + 2 bytes plus fp32 master weights and
  moments (4 + 8), the ZeRO paper's 16 bytes. ZeRO 1 splits the optimizer state over the processes, ZeRO 2 the
  gradients too, ZeRO 3 the weights too; offload moves the optimizer state (and with ZeRO 3 the weights) to CPU memory.
- activations of one micro batch kept for backward: per layer about 17 hidden-sized tensors per token for GPT-2
  (Korthikanti et al. 2022, "Reducing Activation Recomputation", with fused attention: no T x T scores) and
  the Llama equivalent; with activation checkpointing only each layer's input, plus one layer recomputed; and the
  logits, which transformers upcasts to fp32 for the loss (the logits, their fp32 copy and the loss's gradient:
  three vocabulary-wide tensors per token).
- the process itself: Python, torch, transformers and DeepSpeed loaded, measured here on a CPU (on a GPU the CUDA
  context is outside what torch allocates and is not counted).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.files import parse_json
from pipeline.layout import TokensDir, TrainMetrics
from pipeline.output import Echo, silent
from pipeline.tools.child_process import SigtermUnwinds, run_to_end

GB = 1e9


@dataclass
class Shape:
    """The model as the estimate needs it."""

    n_params: int
    n_hidden: int  # parameters in the 2-D hidden matrices (Muon's half)
    n_layer: int
    n_embd: int
    n_inner: int  # MLP width
    vocab: int
    arch: str
    flops_per_token: float


@dataclass
class Plan:
    processes: int
    per_node: int
    tokens_per_step: int
    steps: int | None
    shape: Shape
    memory: dict[str, float]  # bytes per process, by part (device memory)
    cpu_offloaded: float  # bytes per process moved to CPU memory by offload
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


def model_shape(p: Params, vocab: int) -> Shape:
    """The model's shapes and parameter counts, built on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.model.build import count_params, flops_per_token, init_config_dir, scratch_config
    from pipeline.train.optimizer import hidden_matrices

    m = p.model
    if m.is_scratch:
        config = scratch_config(m, vocab, 0)
    else:
        from huggingface_hub.errors import StrictDataclassError

        try:
            config = AutoConfig.from_pretrained(init_config_dir(m.init), trust_remote_code=m.trust_remote_code)
        # Missing or malformed JSON (OSError), no or an unknown model_type (ValueError), a key of the wrong type.
        except (OSError, ValueError, StrictDataclassError) as e:
            raise UserError(f"model.init={m.init!r}: its config.json could not be read ({first_line(e)})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    n_params = count_params(model)
    hidden = hidden_matrices(model)
    named = dict(model.named_parameters())
    c = model.config
    n_layer = getattr(c, "num_hidden_layers", None) or c.n_layer
    n_embd = getattr(c, "hidden_size", None) or c.n_embd
    n_inner = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * n_embd
    return Shape(n_params=n_params, n_hidden=sum(named[n].numel() for n in hidden), n_layer=n_layer, n_embd=n_embd,
                 n_inner=n_inner, vocab=model.get_output_embeddings().weight.shape[0], arch=c.model_type,
                 flops_per_token=flops_per_token(model, n_params, m.block_size))


def tokenized(p: Params) -> dict | None:
    """The tokenize stage's meta.json (its keys checked by its one reader), or None before the data is tokenized."""
    from pipeline.tokens import read_meta

    return read_meta(p.tokenize.out_dir) if TokensDir(p.tokenize.out_dir).meta.is_file() else None


def vocabulary(p: Params, meta: dict | None) -> tuple[int, str | None]:
    """The tokenizer's vocabulary size: from the tokenized data when it exists, else from tokenize.* (and a note)."""
    if meta is not None:
        return meta["vocab_size"], None
    t = p.tokenize
    if t.kind == "bpe":
        return t.vocab_size, None
    if t.kind == "tiktoken":
        import tiktoken

        if t.encoding not in tiktoken.list_encoding_names():
            raise UserError(f"tokenize.encoding: unknown tiktoken encoding {t.encoding!r}; known: "
                            f"{', '.join(tiktoken.list_encoding_names())}")
        try:
            return tiktoken.get_encoding(t.encoding).n_vocab, None
        except (OSError, ValueError, ImportError) as e:  # fetching: requests errors, a hash mismatch, blobfile missing
            raise UserError(f"tokenize.encoding: tiktoken encoding {t.encoding!r} could not be loaded "
                            f"({type(e).__name__}: {first_line(e)}); set TIKTOKEN_CACHE_DIR to a folder holding its files") from None
    if t.kind == "hf":
        from transformers import AutoTokenizer

        try:
            return len(AutoTokenizer.from_pretrained(t.pretrained, trust_remote_code=False)), None
        except (OSError, ValueError) as e:  # missing files, hub unreachable, malformed id, remote code refused
            raise UserError(f"tokenize.pretrained: could not load tokenizer {t.pretrained!r} ({first_line(e)}); use a "
                            "local folder holding its files, or a cached hub id (offline: HF_HUB_OFFLINE=1)") from None
    return 256, f"{p.tokenize.out_dir} is not tokenized yet: a character vocabulary of 256 assumed"


def first_line(e: Exception) -> str:
    line = (str(e).splitlines() or [""])[0]
    return line if len(line) <= 120 else line[:120] + "..."


def memory_per_process(p: Params, s: Shape, processes: int) -> tuple[dict[str, float], float]:
    """(device bytes per process by part, bytes per process moved to CPU memory by offload); see the module doc."""
    t, n = p.train, s.n_params
    low = t.precision in ("bf16", "fp16")
    weight_bytes, grad_bytes = (2, 2) if low else (4, 4)
    # Optimizer state: AdamW's two fp32 moments; with muon one momentum on the hidden matrices; plus fp32 masters.
    state = 8 * n if t.optimizer == "adamw" else 4 * s.n_hidden + 8 * (n - s.n_hidden)
    state += 4 * n if low else 0
    share = lambda stage: processes if t.zero_stage >= stage else 1  # noqa: E731 - what ZeRO splits from this stage on
    parts = {
        "weights": weight_bytes * n / share(3),
        "gradients": grad_bytes * n / share(2),
        "optimizer state": state / share(1),
    }
    offloaded = 0.0
    if t.offload_optimizer:
        offloaded += parts["optimizer state"]
        parts["optimizer state"] = 0.0
    if t.offload_params:
        offloaded += parts["weights"]
        parts["weights"] = 0.0
    parts["activations"] = activation_bytes(p, s)
    return parts, offloaded


def activation_bytes(p: Params, s: Shape) -> float:
    """What one micro batch's forward keeps for its backward pass, at its largest (the loss's backward)."""
    t, m = p.train, p.model
    tokens = t.micro_batch_size * m.block_size
    element = 2 if t.precision in ("bf16", "fp16") else 4
    h, inner = s.n_embd, s.n_inner
    if s.arch == "llama":
        per_layer = 10 * h + 4 * inner  # norms, q k v (+ rotated), attention out, o, norm; gate, up, act, product
    else:
        per_layer = 9 * h + 2 * inner  # 17 hidden-sized tensors at GPT-2's 4x MLP
    if t.activation_checkpointing:
        layers = h * s.n_layer + per_layer  # each layer's input, and one layer recomputed at a time
    else:
        layers = per_layer * s.n_layer
    logits = 3 * s.vocab * 4  # logits, their fp32 copy for the loss, and its gradient (fp32)
    return tokens * (element * (layers + 2 * h) + logits)


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


def make_plan(p: Params, processes: int | None = None) -> Plan:
    import torch

    world, per_node = world_of(p, processes)
    meta = tokenized(p)
    target_steps, target_basis = steps_to_target(p)  # read before a probe spends its time
    vocab, note = vocabulary(p, meta)
    shape = model_shape(p, vocab)
    batch = p.train.batch(world, p.model.block_size)
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
                memory=memory, cpu_offloaded=offloaded, available=available, available_source=source, notes=notes,
                target_steps=target_steps, target_basis=target_basis)


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
        dumped["train"].update(
            max_steps=steps, epochs=None, warmup_steps=min(p.train.warmup_steps, steps), decay_steps=None, log_interval=1,
            eval_interval=steps, save_interval=steps, eval_at_start=False, hellaswag_interval=None, sample_interval=None,
            early_stopping_patience=None, target_loss=None, stop_at_target=False, resume="never", run_name=None,
            out_dir=str(root / "checkpoints"), export_dir=str(root / "export"), metrics_dir=str(root / "metrics"), keep_last=1,
            loggers=["dvclive"])
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


def eta(p: Params, steps: int, probe: Probe) -> float:
    """Seconds a run of `steps` will take, from the probe: its whole process, then the steps, evaluations and saves
    the probe did not do (each as long as the probe's; an improving evaluation saves too when train.export=best)."""
    t = p.train
    evals = set(range(t.eval_interval, steps + 1, t.eval_interval)) | {steps}
    saves = (set(range(t.save_interval, steps + 1, t.save_interval)) if t.save_interval else set()) | {steps}
    if t.export == "best":
        saves |= evals  # the upper end: early on nearly every evaluation improves
    n_evals = len(evals) + (1 if t.eval_at_start else 0)
    return (probe.wall_s + (steps - probe.steps) * probe.seconds_per_step
            + (n_evals - 1) * probe.seconds.get("eval", 0.0) + (len(saves) - 1) * probe.seconds.get("save", 0.0))


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
            rows["ETA"] = f"{duration(eta(p, plan.steps, probe))} for {plan.steps:,} steps, evaluations and saves included"
        if t.target_loss is not None:
            steps, basis = plan.target_steps, plan.target_basis
            rows["ETA to the target"] = (f"{duration(eta(p, steps, probe))} ({basis})" if steps else basis)
    return rows, warning
