"""What the hardware can do: peak FLOP/s for MFU, and TF32 on CUDA."""

from __future__ import annotations

import torch

from pipeline.config import TrainConfig

# Dense peak TFLOP/s per device for MFU. CPU figures were measured on this project's 2-core machines
# (a bf16 and an fp32 matmul at their best); GPU figures are the vendors' dense numbers: bf16/fp16 tensor cores
# (TF32 is half of that), and plain fp32 without tensor cores, which is what fp32 gets with TF32 off.
CPU_PEAK_TFLOPS = {"bf16": 0.35, "fp16": 0.16, "fp32": 0.16}


GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


GPU_FP32_TFLOPS = {"H200": 67.0, "H100": 67.0, "A100": 19.5, "L40S": 91.6, "A10G": 31.2, "L4": 30.3, "V100": 15.7}


NO_TF32 = {"V100"}  # before Ampere: fp32 never runs on tensor cores


def peak_tflops(train: TrainConfig, device: torch.device) -> float:
    if train.peak_tflops:
        return train.peak_tflops
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32  # what use_tf32 set: the peak follows what the matmuls really do
        return gpu_peak_tflops(torch.cuda.get_device_name(device), train.precision, tf32) or 100.0
    return CPU_PEAK_TFLOPS[train.precision]


def gpu_peak_tflops(name: str, precision: str, tf32: bool) -> float | None:
    """The dense peak of the GPU called name at this precision; fp32 counts TF32's peak only when TF32 is on."""
    for key, tensor_cores in GPU_PEAK_TFLOPS.items():
        if key in name:
            if precision != "fp32":
                return tensor_cores
            return tensor_cores / 2 if tf32 and key not in NO_TF32 else GPU_FP32_TFLOPS[key]
    return None


def use_tf32(on: bool) -> None:
    """train.tf32: fp32 matmuls and convolutions on tensor cores in TF32 (CUDA only; a CPU has no such mode)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
