"""`gptpipe doctor`, this machine: Python, torch and its devices, DeepSpeed and its ops, the backend, the master port,
the packages, where model.init and tokenize.pretrained come from, and disk room for the kept checkpoints."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from pipeline.config.all import Params
from pipeline.config.train import TrainConfig
from pipeline.errors import UserError
from pipeline.files import free_bytes
from pipeline.infra.deepspeed import deepspeed_installation
from pipeline.infra.launcher import port_problem

Result = tuple[str, bool, str]  # (check name, ok, detail; a problem's detail says the fix)


def machine_checks(p: Params) -> list[Result]:
    """Every check of this machine for these params."""
    train = p.train
    return [check_python(), *check_torch(train), *check_deepspeed(train), *check_deepspeed_json(p), check_backend(), check_master_port(train.master_port),
            check_packages(), *check_sources(p), check_disk(p)]


def check_python() -> Result:
    version = platform.python_version()
    ok = sys.version_info >= (3, 10)
    return "python", ok, f"{version} ({sys.executable})" + ("" if ok else ": gptpipe needs Python 3.10 or newer")


def check_torch(train: TrainConfig) -> list[Result]:
    results: list[Result] = [("torch", True, f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    if not torch.cuda.is_available():
        results.append(("devices", True, "no CUDA GPU: training runs on CPU with the gloo backend (fine for small models)"))
        return results
    count = torch.cuda.device_count()
    names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(count))
    if train.num_gpus and train.num_gpus > count:
        fix = f"train.num_gpus={train.num_gpus} but this machine has {count}: lower it, or set it to null to use all"
        results.append(("devices", False, f"{count} GPU(s) ({names}); {fix}"))
    else:
        results.append(("devices", True, f"{count} GPU(s): {names}"))
    return results


def check_deepspeed(train: TrainConfig) -> list[Result]:
    """DeepSpeed's version, the precision its accelerator supports, and which C++/CUDA ops it can use."""
    try:
        ds = deepspeed_installation()
    except Exception as e:  # noqa: BLE001 - reported: a broken install raises more than ImportError (e.g. missing CUDA)
        fix = "pip install deepspeed (scripts/setup.sh installs it without build isolation)"
        return [("deepspeed", False, f"cannot import deepspeed ({type(e).__name__}: {e}): {fix}")]
    results: list[Result] = [("deepspeed", True, f"{ds.version} (accelerator: {ds.accelerator})")]

    supported = ds.supports[train.precision]
    detail = f"{ds.accelerator} supports train.precision={train.precision}"
    results.append(("precision", supported, detail if supported else f"{ds.accelerator} does not support train.precision="
                    f"{train.precision}: set it to fp32 (or bf16 where supported)"))

    ninja = shutil.which("ninja")
    cxx = shutil.which(os.environ.get("CXX", "c++"))  # the compiler torch.utils.cpp_extension calls
    detail = (
        f"prebuilt: {', '.join(ds.prebuilt_ops) or 'none'}; JIT-compatible: {', '.join(ds.compatible_ops) or 'none'};"
        f" ninja: {ninja or 'missing'}; C++ compiler: {cxx or 'missing'}" + (f"; probe failed: {', '.join(ds.failed_probes)}" if ds.failed_probes else "")
    )
    # Only offload needs a compiled op: the engine uses torch's AdamW otherwise (infra/deepspeed.py's deepspeed_config).
    problem = ""
    if train.offload_optimizer and "cpu_adam" not in ds.prebuilt_ops:
        if "cpu_adam" not in ds.compatible_ops:
            problem = "train.offload_optimizer needs DeepSpeed's cpu_adam op, which cannot be built here: set it to false"
        elif not (ninja and cxx):
            problem = (
                "train.offload_optimizer JIT-compiles DeepSpeed's cpu_adam op, which needs ninja and a C++ compiler on"
                " PATH: pip install ninja; apt-get install g++ (or set offload_optimizer: false)"
            )
    results.append(("deepspeed ops", not problem, f"{detail}. {problem}" if problem else detail))
    return results


def check_deepspeed_json(p: Params) -> list[Result]:
    """train.deepspeed_config resolved into the params' engine config, as train and plan resolve it."""
    if not p.train.deepspeed_config:
        return []
    from pipeline.tools.plan import resolved_engine, world_of

    try:
        resolved_engine(p, p.train.batch(world_of(p, None)[0], p.model.block_size))
    except UserError as e:
        return [("deepspeed json", False, str(e))]
    return [("deepspeed json", True, f"{p.train.deepspeed_config}: its keys agree with the params (owned keys \"auto\" or equal)")]


def check_backend() -> Result:
    dist = torch.distributed
    if not dist.is_available():
        return "backend", False, "this torch build has no torch.distributed: install a standard torch wheel"
    if torch.cuda.is_available():
        if dist.is_nccl_available():
            return "backend", True, "nccl (GPUs)"
        return "backend", False, "CUDA is available but NCCL is not in this torch build: install a CUDA wheel of torch"
    if dist.is_gloo_available():
        return "backend", True, "gloo (CPU)"
    return "backend", False, "gloo is not in this torch build: install a standard CPU wheel of torch"


def check_master_port(port: int) -> Result:
    """Bind the rendezvous port as torch's TCPStore will, on every interface of this (the first) node."""
    problem = port_problem(port)
    return ("master port", False, problem) if problem else ("master port", True, f"{port} is free on this machine")


def check_packages() -> Result:
    names = ("transformers", "tokenizers", "datasets", "dvc", "dvclive", "tiktoken")
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing" + (" (optional: pip install 'gptpipe[data]')" if name == "datasets" else ""))
    missing = [f for f in found if f.endswith("missing")]
    return "packages", not missing, ", ".join(found) + (": reinstall with scripts/setup.sh" if missing else "")


def check_sources(p: Params) -> list[Result]:
    """Whether model.init and tokenize.pretrained can be had: a local folder, the Hugging Face cache, or the hub."""
    results = []
    for key, name in (("model.init", None if p.model.is_scratch else p.model.init), ("tokenize.pretrained", p.tokenize.pretrained)):
        if name:
            results.append(reachable(key, name))
    return results


def reachable(key: str, name: str) -> Result:
    if Path(name).exists():
        ok = Path(name).is_dir() and any((Path(name) / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json"))
        return key, ok, f"{name}: a local folder" + ("" if ok else " without config.json or tokenizer files: save one there with save_pretrained")
    from huggingface_hub import try_to_load_from_cache

    for file in ("config.json", "tokenizer_config.json"):
        if isinstance(try_to_load_from_cache(name, file), str):
            return key, True, f"{name}: in the Hugging Face cache (works offline)"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return key, False, f"{name}: not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it once with network access"
    gated = " Gated models (Gemma, Llama) need their licence accepted on the hub and HF_TOKEN set (huggingface-cli login)."
    try:
        from huggingface_hub import model_info
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        info = model_info(name, timeout=10)
        # The hub describes a gated repo to anyone; only the download needs the accepted licence and a token.
        if getattr(info, "gated", False) and not (os.environ.get("HF_TOKEN") or _saved_hf_token()):
            return key, False, f"{name}: gated on the hub ({info.gated} approval) and no HF_TOKEN is set.{gated}"
        return key, True, f"{name}: on the hub; it downloads on first use (set HF_HOME to cache it somewhere roomy)"
    except GatedRepoError:
        return key, False, f"{name}: gated on the hub.{gated}"
    except RepositoryNotFoundError:
        return key, False, f"{name}: no such model on the hub (or private: set HF_TOKEN).{gated}"
    except Exception as e:  # noqa: BLE001 - any network failure is the same answer: not reachable from here
        return key, False, f"{name}: the hub is unreachable ({type(e).__name__}); use a local folder, or download it once elsewhere.{gated}"


def _saved_hf_token() -> str | None:
    """The token `huggingface-cli login` saved, if any."""
    try:
        from huggingface_hub import get_token

        return get_token()
    except ImportError:
        return None


def check_disk(p: Params) -> Result:
    """Free space where checkpoints go, against what the run keeps: plan's checkpoint size (weights and optimizer
    state, tools/estimate.py) times the checkpoints kept at once, and the export."""
    folder = Path(p.train.out_dir)
    free = free_bytes(folder)
    try:
        n, per_checkpoint = checkpoint_estimate(p)
    except UserError as e:
        return "disk", True, f"{free / 1e9:,.1f} GB free for train.out_dir ({folder}); model size unknown here ({e})"
    kept = p.train.keep_last + 2  # plus the best and the one being written
    need = per_checkpoint * kept + n * 4  # and the exported weights
    detail = (f"{free / 1e9:,.1f} GB free for train.out_dir ({folder}); a checkpoint of {n / 1e6:,.1f}M parameters is about"
              f" {per_checkpoint / 1e9:,.2f} GB, {kept} kept at once about {need / 1e9:,.2f} GB")
    return "disk", free >= need, detail + ("" if free >= need else ": free space, lower train.keep_last, or move train.out_dir")


def checkpoint_estimate(p: Params) -> tuple[int, float]:
    """(parameters, bytes of one checkpoint) by plan's model, the vocabulary read where plan reads it; a UserError
    says why they are unknown here (a hub model: doctor downloads nothing; a tokenizer or config it cannot read)."""
    from pipeline.tools.estimate import checkpoint_bytes, estimated_shape, tokenized

    if not (p.model.is_scratch or Path(p.model.init).is_dir()):
        raise UserError(f"model.init={p.model.init!r} is not a local folder")
    shape, _ = estimated_shape(p, tokenized(p))
    return shape.n_params, checkpoint_bytes(p, shape)
