"""Every correction gptpipe makes to DeepSpeed (and to what torch does for it), each a context manager that checks
the thing it patches is still there, names the DeepSpeed version it was written against and the upstream issue, and
puts back what it changed on exit.

Callers enter them around exactly the DeepSpeed calls that need them (engine construction, process groups,
checkpoint loads, conversion). Two must hold while the whole run trains and are entered once by the train setup:
`eager_muon` (DeepSpeed calls Muon's update inside every backward and step) and `deepspeed_environment` (DeepSpeed
may build an op at any call). An installed DeepSpeed in which a patched name is gone raises `CorrectionMissing`
instead of training without the correction.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch

from pipeline.errors import UserError

WRITTEN_FOR = "0.19.8"  # the DeepSpeed every correction here was written and tested against (pyproject.toml bounds it)


class CorrectionMissing(UserError):
    """The installed DeepSpeed lacks what a correction patches: training without it would silently differ."""


def installed_version() -> str:
    try:
        return importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def missing(correction: str, what: str) -> CorrectionMissing:
    return CorrectionMissing(
        f"DeepSpeed {installed_version()} lacks {what}, which gptpipe's correction `{correction}` (written for DeepSpeed"
        f" {WRITTEN_FOR}) patches: install deepspeed=={WRITTEN_FOR} (the version pyproject.toml allows), or review"
        f" that correction in pipeline/infra/deepspeed_fixes.py against this DeepSpeed"
    )


def require(correction: str, module, names: tuple[str, ...]) -> dict[str, object]:
    """name -> module.name for each name, or CorrectionMissing naming the first one absent."""
    found = {}
    for name in names:
        if not hasattr(module, name):
            raise missing(correction, f"{getattr(module, '__name__', module)}.{name}")
        found[name] = getattr(module, name)
    return found


@contextmanager
def swapped(module, originals: dict[str, object], replacements: dict[str, object]) -> Iterator[None]:
    """module's attributes set to replacements while the block runs, then originals again (also on an exception)."""
    try:
        for name, value in replacements.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


def source_mentions(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(encoding="utf-8")
    except OSError:
        return False


def deepspeed_file(relative: str) -> Path:
    """A file of the installed DeepSpeed, found without importing it (its import already picks an accelerator)."""
    spec = importlib.util.find_spec("deepspeed")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return Path(roots[0] if roots else ".") / relative


# --- the environment DeepSpeed reads ------------------------------------------------------------------------------


def extensions_dir() -> Path:
    """~/.cache/torch_extensions/<python>-<device>-<this environment's prefix, hashed>: one per environment."""
    tag = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
    device = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "torch_extensions" / f"py{sys.version_info[0]}{sys.version_info[1]}_{device}-{tag}"


@contextmanager
def deepspeed_environment(accelerator_file: Path | None = None, extensions_reader=None) -> Iterator[None]:
    """DS_ACCELERATOR=cpu on a machine without CUDA, and TORCH_EXTENSIONS_DIR to a folder of this environment's own,
    unless the user set them; on exit the environment is as it was.

    Written for DeepSpeed 0.19.8. DeepSpeed picks its accelerator from DS_ACCELERATOR alone, once, at its first
    get_accelerator() (real_accelerator.py), and otherwise guesses with a warning ("Setting accelerator to CPU ...
    we were unable to detect it"); no upstream issue found for that warning on a machine that has only a CPU. The ops
    it compiles on first use (cpu_adam for offload, fused ones on GPUs) go to torch's one folder per Python version,
    shared by every virtual environment, whose build commands name the environment's paths, so two environments used
    in turn rebuilt each other's ops every time (20-57 s here): DeepSpeed issue #730 (and PR #959, which documents
    TORCH_EXTENSIONS_DIR as the way out; torch's side is pytorch/pytorch#51892).

    Held for the whole run by the train setup: DeepSpeed builds an op whenever a feature first needs it, not only while
    the engine is made. accelerator_file and extensions_reader are what the check reads (tests point them elsewhere).
    """
    name = "deepspeed_environment"
    accelerator_file = accelerator_file or deepspeed_file("accelerator/real_accelerator.py")
    if not source_mentions(accelerator_file, "DS_ACCELERATOR"):
        raise missing(name, f"the DS_ACCELERATOR switch in {accelerator_file}")
    if extensions_reader is None:
        import torch.utils.cpp_extension as extensions_reader
    build_directory = require(name, extensions_reader, ("_get_build_directory",))["_get_build_directory"]
    code = getattr(build_directory, "__code__", None)
    if code is None or "TORCH_EXTENSIONS_DIR" not in code.co_consts:
        raise missing(name, "torch's TORCH_EXTENSIONS_DIR switch (torch.utils.cpp_extension._get_build_directory)")
    wanted = {"TORCH_EXTENSIONS_DIR": str(extensions_dir())}
    if not torch.cuda.is_available():
        wanted["DS_ACCELERATOR"] = "cpu"
    added = [key for key in wanted if key not in os.environ]
    try:
        for key in added:
            os.environ[key] = wanted[key]
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


# --- engine construction ------------------------------------------------------------------------------------------


@contextmanager
def muon_tags_kept(groups: list[dict], deepspeed_module=None) -> Iterator[None]:
    """While deepspeed.initialize runs: keep the `use_muon` tags gptpipe set on its parameters.

    Written for DeepSpeed 0.19.8, whose initialize re-tags every parameter (set_optimizer_flags, added by PR #7555;
    its name rule by PR #7641: Muon for each 2-D parameter whose name holds neither "embed" nor "lm_head"). That puts
    GPT-2's wte and wpe on Muon whatever the caller chose; no upstream issue found for honouring a caller's own tags
    (PR #8440 is the same kind of slip for the param groups). DeepSpeed's tags are made, then ours put back, so
    anything else it records alongside stays.
    """
    import deepspeed

    module = deepspeed_module if deepspeed_module is not None else deepspeed
    original = require("muon_tags_kept", module, ("set_optimizer_flags",))["set_optimizer_flags"]
    tags = {id(p): p.use_muon for g in groups for p in g["params"] if hasattr(p, "use_muon")}

    def set_flags(config_class, model):
        original(config_class, model)
        for p in model.parameters():
            if id(p) in tags:
                p.use_muon = tags[id(p)]

    with swapped(module, {"set_optimizer_flags": original}, {"set_optimizer_flags": set_flags}):
        yield


# The compiled Muon functions, by module: muon_optimizer holds its own reference to muon_update, taken at import.
MUON_FUNCTIONS = {
    "deepspeed.runtime.zero.muon.original_muon": ("muon_update", "zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz"),
    "deepspeed.runtime.zero.muon.muon_optimizer": ("muon_update",),
}


@contextmanager
def eager_muon(modules: dict | None = None) -> Iterator[None]:
    """Muon's update (momentum and Newton-Schulz) run eagerly, on a CPU: the functions torch.compile wrapped,
    unwrapped while the block runs.

    Written for DeepSpeed 0.19.8, which decorates them with its compiler.compile() (original_muon.py). On a CPU the
    compile and its guards cost more than they save at these sizes, and its CPU kernels gave another loss from one run
    to the next (the shakespeare-char recipe with Muon, 800 steps: 1.8750, 1.8678, 1.8750 on the whole val split); no
    upstream issue found. Held for the whole run by the train setup: DeepSpeed calls muon_update inside every backward
    (ZeRO 1-3 reduce the gradients through it) and every step. modules: name -> module (tests pass stand-ins).
    """
    if modules is None:
        modules = {name: importlib.import_module(name) for name in MUON_FUNCTIONS}
    with_originals = []
    for name, names in MUON_FUNCTIONS.items():
        found = require("eager_muon", modules[name], names)
        with_originals.append((modules[name], found, {n: getattr(fn, "_torchdynamo_orig_callable", fn) for n, fn in found.items()}))
    try:
        for module, _, eager in with_originals:
            for attr, fn in eager.items():
                setattr(module, attr, fn)
        yield
    finally:
        for module, originals, _ in with_originals:
            for attr, fn in originals.items():
                setattr(module, attr, fn)


@contextmanager
def shm_op_skipped(comm_module=None) -> Iterator[None]:
    """While deepspeed.init_distributed makes its communication backend: no build of its CPU shared-memory op.

    Written for DeepSpeed 0.19.8, whose TorchBackend compiles and loads that op when it starts (comm/torch.py,
    build_shm_op, since PR #5391), though it uses it in one place, inference_all_reduce (tensor-parallel inference);
    training's collectives are torch.distributed's. Building it cost 20-57 s whenever its cache folder was stale, and
    probing for it compiles test programs for every op. No upstream issue found for building it in training
    (issue #7625 asks for a way around the same op for inference).
    """
    # By module name: `import deepspeed.comm.torch as m` would give torch itself (deepspeed.comm imports torch).
    module = comm_module if comm_module is not None else importlib.import_module("deepspeed.comm.torch")
    original = require("shm_op_skipped", module, ("build_shm_op",))

    def no_shm_op():
        return None

    with swapped(module, original, {"build_shm_op": no_shm_op}):
        yield


@contextmanager
def group_timeout(timeout_s: int, c10d=None) -> Iterator[None]:
    """While DeepSpeed makes its process groups: torch's default process-group timeout is timeout_s, then put back.

    Written for DeepSpeed 0.19.8, which makes its data-parallel groups (and zero.Init's) with new_group() and no
    timeout, so they take torch's default (30 minutes for gloo), not the world's: a frozen rank would hold every other
    one that long instead of train.collective_timeout. DeepSpeed issue #2927 (no way to set the timeout of the groups
    zero.Init makes).
    """
    if c10d is None:
        from torch.distributed import distributed_c10d as c10d
    names = ("default_pg_timeout", "default_pg_nccl_timeout")
    originals = require("group_timeout", c10d, names)
    with swapped(c10d, originals, dict.fromkeys(names, timedelta(seconds=timeout_s))):
        yield


# --- checkpoints --------------------------------------------------------------------------------------------------

# Where DeepSpeed 0.19.8 keeps the classes its checkpoint files hold besides tensors and containers (found by loading
# every file of ZeRO 0-3, fp32 and bf16 with weights_only=True): plain values, whose unpickling runs none of the file's code.
CHECKPOINT_CLASSES = {
    "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler"),
    "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
    "deepspeed.utils.tensor_fragment": ("fragment_address",),
}


@contextmanager
def weights_only_loads(modules: dict | None = None) -> Iterator[None]:
    """Every torch.load inside refuses a pickle that would run code, DeepSpeed's own loads included; only DeepSpeed's
    value classes are allowed besides tensors and containers.

    Written for DeepSpeed 0.19.8, whose checkpoint loads (engine.load_checkpoint, ds_to_universal,
    zero_to_fp32, the universal loader) pass weights_only=False explicitly (PR #6751 made that explicit), so a
    checkpoint handed to gptpipe could run code when loaded. TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 overrides their
    argument; torch.serialization.safe_globals allows DeepSpeed's classes. modules: name -> module (tests pass stand-ins).
    """
    name = "weights_only_loads"
    if modules is None:
        modules = {module: importlib.import_module(module) for module in CHECKPOINT_CLASSES}
    allowed = [cls for module, names in CHECKPOINT_CLASSES.items() for cls in require(name, modules[module], names).values()]
    safe_globals = require(name, torch.serialization, ("safe_globals",))["safe_globals"]
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with safe_globals(allowed):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


@contextmanager
def universal_load(engine, universal: bool) -> Iterator[None]:
    """Around engine.load_checkpoint: the format (DeepSpeed's or its universal one) set for this load only, and two
    slips of DeepSpeed's ZeRO-3 universal loader undone after it.

    Written for DeepSpeed 0.19.8. The format is DeepSpeed's config key checkpoint.load_universal, which it reads only
    while loading (engine._config.load_universal_checkpoint): one run may load a universal checkpoint (to resume)
    and then its own (the best, to export), so it is set per load and put back after. The slips, in
    stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3: it gives every param group the saved first group's
    settings (weight decay on biases and norms too), so this run's settings, identical to the saved ones, are put
    back; and it hands every group one shared `step` tensor, which torch's AdamW then advances once per group per step
    (wrong bias correction from the second group on), so each gets its own. No upstream issue found for either (PR
    #7585 fixed the converter's side of several param groups under ZeRO-3, not the loader's).
    """
    config = getattr(engine, "_config", None)
    if not hasattr(config, "load_universal_checkpoint"):
        raise missing("universal_load", "the engine's config key load_universal_checkpoint (engine._config)")
    before = config.load_universal_checkpoint
    settings = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    config.load_universal_checkpoint = universal
    try:
        yield
        if universal:
            for group, setting in zip(engine.optimizer.param_groups, settings):
                group.update(setting)
            inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
            for state in inner.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
    finally:
        config.load_universal_checkpoint = before


# Every correction, by name: what tests walk to check that each restores what it changed and refuses a DeepSpeed
# without what it patches.
CORRECTIONS = ("deepspeed_environment", "muon_tags_kept", "eager_muon", "shm_op_skipped", "group_timeout",
               "weights_only_loads", "universal_load")
