"""What the plan knows about devices: published peak rates of the GPUs it can be asked about,
the device a study would run on, and a measured matmul rate for any other device."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """Published dense (no sparsity) peak rates of one accelerator (SXM parts)."""

    name: str
    bf16_flops: float  # tensor-core bf16/fp16, dense
    tf32_flops: float  # tensor-core TF32, dense (SAE training: fp32 weights, TF32 matmuls)
    bandwidth: float  # bytes/s of device memory
    memory: int  # bytes of device memory


GPUS = {
    "h100": GPU("H100 SXM", 989e12, 494e12, 3.35e12, 80 * 10**9),
    "h200": GPU("H200 SXM", 989e12, 494e12, 4.8e12, 141 * 10**9),
    "a100": GPU("A100 SXM 80GB", 312e12, 156e12, 2.04e12, 80 * 10**9),
}


def measured_rate(device: str) -> float:
    """FLOP/s of a float32 1024 x 1024 matmul on `device`, timed once (about 0.2 s)."""
    import torch

    n = 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ b
        reps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - start)


def detect_device(requested: str | None = None) -> tuple[str, GPU | None]:
    """(description, GPU rates or None) of the device the study would run on."""
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
        for key, gpu in GPUS.items():
            if key in name.lower():
                return name, gpu
        return name, None
    return device, None
