"""BatchTopK crosscoder training throughput and FLOP utilisation, as ratios within one run.

The crosscoder is an SAE over [x_base, x_chat] (width 2D), trained by the shared loop with the
crosscoder trainer. FLOP of one step (batch B, D = d_model, F latents, N = B·k kept pairs),
counted as bench_train.py counts TopK/BatchTopK with csr kernels:
- encoder GEMM 2·B·(2D)·F (both models' encoder blocks in one product);
- four sparse products of 2·N·(2D): decoder forward, code gradient, decoder weight gradient,
  encoder weight gradient (only the kept pairs);
- the score pass ReLU(pre)·(‖d^base‖+‖d^chat‖), the selection, biases and Adam are not counted.
With --sparse-kernels dense (CUDA default) the step is 5 GEMMs: 10·B·(2D)·F.
The bar is that count ÷ the dense matmul FLOP/s measured here, at the step's three matmul
shapes (B×2D·2D×F, B×F·F×2D, 2D×B·B×F), best of a few repeats, in the same precision.

    python bench/bench_crosscoder.py                         # CPU, d_model 128 and 256
    python bench/bench_crosscoder.py --device cuda --shapes 2048x32768 --batch 4096 --k 100

Absolute numbers move with machine load; compare the ratio (check `uptime` first).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_transfer.diffing.crosscoder_run import CrosscoderConfig, new_run
from sae_transfer.diffing.paired import PairedCaches
from sae_transfer.training.config import TrainConfig
from sae_transfer.training.device import resolve_device, synchronize
from sae_transfer.training.loop import train_step


def matmul_flops(B: int, D2: int, F: int, device: torch.device, repeats: int = 3) -> float:
    """Dense fp32 matmul FLOP/s at the step's three matmul shapes (best of `repeats`)."""
    x, W, f, g = (torch.randn(*s, device=device) for s in ((B, D2), (D2, F), (B, F), (B, D2)))
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(x, W)
        torch.mm(f, W.T)
        torch.mm(g.T, f)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 3 * 2 * B * D2 * F / best


def step_flops(kernels: str, B: int, D2: int, F: int, k: int) -> float:
    """FLOP one crosscoder step does (module docstring)."""
    return 2 * B * D2 * F + 4 * 2 * B * k * D2 if kernels == "csr" else 10 * B * D2 * F


def time_steps(D: int, F: int, B: int, k: int, steps: int, device: str | None, kernels: str) -> tuple[float, str]:
    """(median seconds per step, kernels used) on random paired batches with a sparse structure."""
    train = TrainConfig(arch="batchtopk", d_sae=F, k=k, total_tokens=B * (steps + 10), batch_size=B, lr=1e-4,
                        log_every_steps=10**9, device=device, sparse_kernels=kernels)
    pair = PairedCaches(None, None, "bench", D, B, 1.0, 1.0, {})
    run = new_run(CrosscoderConfig(train=train), pair)
    run.trainer.init_weights(torch.Generator().manual_seed(0), torch.zeros(2 * D))
    dev = run.numerics.device
    gen = torch.Generator().manual_seed(1)
    feats = torch.nn.functional.normalize(torch.randn(4 * D, D, generator=gen), dim=-1)
    codes = torch.rand(B, 4 * D, generator=gen) * (torch.rand(B, 4 * D, generator=gen) < 8 / (4 * D))
    base = codes @ feats
    x_B2D = torch.cat([base, base + 0.1 * torch.randn(B, D, generator=gen)], -1).to(dev)
    for _ in range(2):
        train_step(run, x_B2D)
    times = []
    for _ in range(steps):
        synchronize(dev)
        t0 = time.perf_counter()
        train_step(run, x_B2D)
        synchronize(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), run.trainer.sparse_kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x2048,256x4096", help="d_model x d_sae, comma separated")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default=None)
    ap.add_argument("--sparse-kernels", default="auto", choices=("auto", "csr", "dense"))
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch}, k {args.k}")
    print(f"{'d_model x F':>12} {'kern':>5} {'tok/s':>9} {'GFLOP/s':>9} {'matmul':>9} {'÷matmul':>8}")
    for shape in args.shapes.split(","):
        D, F = (int(v) for v in shape.split("x"))
        step_s, kernels = time_steps(D, F, args.batch, args.k, args.steps, args.device, args.sparse_kernels)
        flops = step_flops(kernels, args.batch, 2 * D, F, args.k) / step_s
        mm = matmul_flops(args.batch, 2 * D, F, device)
        print(f"{shape:>12} {kernels:>5} {args.batch / step_s:9.0f} {flops / 1e9:9.1f} {mm / 1e9:9.1f} {flops / mm:8.2f}")


if __name__ == "__main__":
    main()
