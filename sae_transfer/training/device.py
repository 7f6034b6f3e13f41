"""Where and in which precision a training run computes: the device, the matmul dtype, TF32,
and which kernels the sparse architectures use. Resolved once per run and recorded in run.json.

Plain torch: imports neither prefect nor duckdb."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sae_transfer.errors import UserError
from sae_transfer.models import check_device
from sae_transfer.training.config import TrainConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Numerics:
    """The resolved runtime settings of a run (what run.json's `numerics` records)."""

    device: torch.device  # where weights, Adam state and batches live
    compute_dtype: torch.dtype  # dtype of the large matmuls (fp32, or bf16 autocast-style)
    tf32: bool  # CUDA fp32 matmuls allowed to use TF32 (always False on CPU)
    sparse_kernels: str  # "csr" or "dense" (auto resolved)

    def to_dict(self) -> dict:
        """JSON-ready form for run.json."""
        return {"device": str(self.device), "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
                "tf32": self.tf32, "sparse_kernels": self.sparse_kernels,
                "float32_matmul_precision": self.float32_matmul_precision()}

    def float32_matmul_precision(self) -> str:
        """torch's float32 matmul precision while this run trains (`run_precision` sets it on
        CUDA; on CPU the process's own setting applies)."""
        if self.device.type == "cuda":
            return "high" if self.tf32 else "highest"
        return torch.get_float32_matmul_precision()


def resolve_device(name: str | None) -> torch.device:
    """torch.device for `name` (None: CUDA when available, else CPU). UserError when the
    device does not exist here (`models.check_device`) or is neither a CPU nor a CUDA GPU."""
    device = torch.device(check_device(name))
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device={name!r}: training runs on cpu or cuda")
    return device


def resolve_numerics(cfg: TrainConfig) -> Numerics:
    """The run's Numerics (TF32 is switched on or off only while training: `run_precision`)."""
    device = resolve_device(cfg.device)
    tf32 = cfg.tf32 and device.type == "cuda"
    kernels = cfg.sparse_kernels
    if kernels == "auto":
        # CPU: the torch.sparse products are fastest (bench_train.py). CUDA, by count: at
        # 2048 x 32768, batch 4096, the csr step measured 16 ms on an H100 (256k tok/s, TF32),
        # of which the one dense encoder GEMM is ~2 ms; the dense path is 5 such GEMMs (~9 ms
        # at TF32, ~4 ms in bf16) with no format conversions or host syncs. Measure both with
        # bench_train.py --device cuda --sparse-kernels csr,dense.
        kernels = "dense" if device.type == "cuda" else "csr"
    return Numerics(device, _DTYPES[cfg.dtype], tf32, kernels)


@contextmanager
def run_precision(numerics: Numerics) -> Iterator[None]:
    """For the duration of a training run, let CUDA fp32 matmuls use TF32 or not as
    numerics.tf32 says (so a run never depends on what ran before it); afterwards, even when
    the run raises, restore the process-wide torch settings that were in force (so later
    evaluations in the same process compute in their own precision). Nothing changes on CPU."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = torch.get_float32_matmul_precision(), matmul.allow_tf32, cudnn.allow_tf32
    try:
        if numerics.device.type == "cuda":
            torch.set_float32_matmul_precision(numerics.float32_matmul_precision())
            matmul.allow_tf32 = cudnn.allow_tf32 = numerics.tf32
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        matmul.allow_tf32, cudnn.allow_tf32 = saved[1], saved[2]


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (a no-op on CPU); for honest timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
