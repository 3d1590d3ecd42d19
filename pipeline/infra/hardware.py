"""What the hardware can do: the peak FLOP/s MFU is measured against, and TF32 on CUDA."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config.train import TrainConfig
from pipeline.machine import cpu_model

# GPU dense peaks, the vendors' figures: bf16/fp16 tensor cores (TF32 is half of that), and plain fp32 without
# tensor cores, which is what fp32 gets with TF32 off. A GPU not listed, and every CPU, is measured instead.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}
GPU_FP32_TFLOPS = {"H200": 67.0, "H100": 67.0, "A100": 19.5, "L40S": 91.6, "A10G": 31.2, "L4": 30.3, "V100": 15.7}
NO_TF32 = {"V100"}  # before Ampere: fp32 never runs on tensor cores
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CALIBRATION_SIZES = (1024, 2048, 4096)  # square matmuls; the best of them is the peak
CALIBRATION_SECONDS = 0.25  # per size, at most: about a second once per machine, precision and thread count


@dataclass(frozen=True)
class Peak:
    tflops: float
    source: str  # how it was found, for the summary: "train.peak_tflops", "H100 bf16 dense (vendor)", "measured ..."


def peak(train: TrainConfig, device: torch.device) -> Peak:
    """The peak MFU is taken against: train.peak_tflops when set, a known GPU's dense figure, else measured here
    by a short matmul calibration (cached per machine, precision and thread count)."""
    if train.peak_tflops:
        return Peak(train.peak_tflops, "train.peak_tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32  # what use_tf32 set: the peak follows what the matmuls really do
        known = gpu_peak_tflops(name, train.precision, tf32)
        if known:
            return Peak(known, f"{name} {train.precision}{' (TF32)' if train.precision == 'fp32' and tf32 else ''} dense peak, vendor figure")
    return measured_peak(train.precision, device)


def gpu_peak_tflops(name: str, precision: str, tf32: bool) -> float | None:
    """The dense peak of the GPU called name at this precision; fp32 counts TF32's peak only when TF32 is on."""
    for key, tensor_cores in GPU_PEAK_TFLOPS.items():
        if key in name:
            if precision != "fp32":
                return tensor_cores
            return tensor_cores / 2 if tf32 and key not in NO_TF32 else GPU_FP32_TFLOPS[key]
    return None


def measured_peak(precision: str, device: torch.device) -> Peak:
    """The best matmul rate of this device at this precision, measured once and cached in ~/.cache/gptpipe."""
    key = machine_key(precision, device)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptpipe" / "peaks.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known.get(key), dict) or not isinstance(known[key].get("tflops"), (int, float)):
        known[key] = {"tflops": calibrate(DTYPES[precision], device), "when": time.strftime("%Y-%m-%d")}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=2) + "\n")
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home: measured again next time
    entry = known[key]
    shown = str(cache).replace(str(Path.home()), "~", 1)
    return Peak(float(entry["tflops"]), f"{precision} matmul measured on this machine ({entry['when']}, cached in {shown})")


def machine_key(precision: str, device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = cpu_model() + f" x{torch.get_num_threads()} threads"
    digest = hashlib.sha1(f"{what}|{torch.__version__}".encode()).hexdigest()[:8]
    return f"{device.type}-{precision}-{digest}"


def calibrate(dtype: torch.dtype, device: torch.device) -> float:
    """TFLOP/s of the best of a few square matmuls at dtype: what a well-shaped dense kernel reaches here."""
    best = 0.0
    for n in CALIBRATION_SIZES:
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: kernels chosen, memory touched
        sync(device)
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < CALIBRATION_SECONDS or runs < 2:
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e12)
            runs += 1
    return round(best, 4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_tf32(on: bool) -> None:
    """train.tf32: fp32 matmuls and convolutions on tensor cores in TF32 (CUDA only; a CPU has no such mode)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def peak_memory(device: torch.device) -> int:
    """Bytes this process has held at most: allocated by torch on a GPU (the CUDA context aside), resident on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
