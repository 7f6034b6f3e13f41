"""Training throughput of every SAE architecture, as ratios measured within one run.

For each shape (d_in × d_sae), precision and architecture it reports tokens/s; the FLOP the
step really does, counted per architecture (below); that count ÷ this device's dense matmul
FLOP/s in the same precision, measured in the same run at the same shapes; and training from
the Parquet cache ÷ from memory (CPU).

How the FLOP are counted (one step, batch B, D = d_in, F = d_sae, N active pairs):
- relu, jumprelu dense step, topk/batchtopk with --sparse-kernels dense: 5 GEMMs of 2·B·D·F
  (encoder forward, decoder forward, the decoder's two gradients, the encoder's weight
  gradient) = 10·B·D·F. The usual 12·B·D·F also counts the input's gradient, which an SAE
  never needs: dividing 12·B·D·F by the matmul rate overstates the step (by 1.2×).
- topk/batchtopk csr, jumprelu's sparse step: the encoder GEMM 2·B·D·F plus four sparse
  products of 2·N·D (decoder forward, value and weight gradients, encoder weight gradient);
  N = B·k for topk/batchtopk, the pairs near or above θ for jumprelu.
- bias terms, elementwise passes, top-k selection and Adam are not counted.
The matmul rate is measured with the same TF32 setting as the step, and the script prints
`allow_tf32` and torch's float32 matmul precision, so TF32 is never on silently.

SAELens lines are constants recorded elsewhere (another day, another run), not measured here:
compare them with care.

    python bench/bench_train.py                       # CPU, both reference shapes, all architectures
    python bench/bench_train.py --shapes 128x2048 --archs relu,topk --steps 6
    python bench/bench_train.py --device cuda --shapes 2048x32768 --precisions fp32,tf32,bf16 --sparse-kernels csr,dense

Absolute numbers move with machine load; compare ratios from one run (check `uptime` first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_transfer.training import TrainConfig
from sae_transfer.training.device import resolve_device, synchronize
from sae_transfer.training.loop import train_step
from sae_transfer.training.run import fresh_run
from sae_transfer.training.sources import in_memory_factory

# Recorded elsewhere, not measured by this script. ("cpu", d_in, d_sae, arch, precision) ->
# tokens/s of SAELens 6's own trainer, batch 4096, in-memory activations: the CPU figures on the
# project's 2-core development machine; the CUDA figures SAELens 6.54.12 on one H100.
SAELENS_RECORDED = {
    ("cpu", 128, 2048, "relu", "fp32"): 12_600, ("cpu", 256, 4096, "relu", "fp32"): 4_200,
    ("cuda", 2048, 32768, "relu", "fp32"): 53_872, ("cuda", 2048, 32768, "relu", "tf32"): 188_364,
    ("cuda", 2048, 32768, "relu", "bf16"): 230_423, ("cuda", 2048, 32768, "topk", "tf32"): 169_315,
    ("cuda", 2048, 32768, "topk", "bf16"): 201_372,
}
PRECISIONS = {"fp32": ("float32", False), "tf32": ("float32", True), "bf16": ("bfloat16", False)}


def _si(flops: float) -> str:
    return f"{flops / 1e12:.1f}T" if flops >= 1e12 else f"{flops / 1e9:.1f}G"


def set_tf32(device: torch.device, on: bool) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on


def matmul_flops(B: int, D: int, F: int, device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """Dense matmul FLOP/s at the three matmul shapes of an SAE step (best of `repeats`)."""
    opts = dict(device=device, dtype=dtype)
    x, W, f, g = torch.randn(B, D, **opts), torch.randn(D, F, **opts), torch.randn(B, F, **opts), torch.randn(B, D, **opts)
    out_BF, out_DF, out_BD = torch.empty(B, F, **opts), torch.empty(D, F, **opts), torch.empty(B, D, **opts)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(x, W, out=out_BF)
        torch.mm(f, W.T, out=out_BD)
        torch.mm(g.T, f, out=out_DF)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 3 * 2 * B * D * F / best


def step_flops(arch: str, kernels: str, B: int, D: int, F: int, n_active: int) -> float:
    """FLOP one step really does (see the module docstring)."""
    sparse = kernels == "csr" and (arch in ("topk", "batchtopk") or (arch == "jumprelu" and n_active <= 0.05 * B * F))
    return 2 * B * D * F + 4 * 2 * n_active * D if sparse else 10 * B * D * F


def time_training(cfg: TrainConfig, source_factory, D: int, k: int, steps: int) -> tuple[float, int, float]:
    """(seconds per step, active pairs in the first batch, peak device memory in GiB or nan).
    CPU: median over `steps` timed one by one; CUDA: their mean, timed as one block."""
    run = fresh_run(cfg, source_factory, D, None)
    device, F = run.numerics.device, cfg.d_sae
    batches = iter(source_factory(0))
    x_BD = next(iter(source_factory(0))).to(device) * run.state.scale_factor
    with torch.no_grad():
        pre_BF = run.sae.pre_acts(x_BD)
        if cfg.arch == "jumprelu":  # steady state: thresholds leaving about k active latents per token
            rank = max(1, math.ceil((1 - k / F) * pre_BF.shape[0]))  # kthvalue: quantile() caps inputs at 2^24
            run.sae.threshold.copy_(pre_BF.kthvalue(rank, dim=0).values.clamp_min(1e-3))
            n_active = int((pre_BF > run.sae.threshold - cfg.jumprelu_bandwidth / 2).sum())
        else:
            n_active = cfg.batch_size * k
        del pre_BF
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # warm-up
        train_step(run, next(batches))
    times = []
    synchronize(device)
    t_block = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(run, next(batches))
        if device.type == "cpu":
            times.append(time.perf_counter() - t0)
    synchronize(device)
    if device.type == "cuda":
        run.nonfinite.check(cfg.batch_size)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        return (time.perf_counter() - t_block) / steps, n_active, peak
    return statistics.median(times), n_active, float("nan")


def write_parquet_cache(path: Path, acts_ND: torch.Tensor) -> Path:
    """A float32 activation dataset holding acts_ND, through the cache writer."""
    from sae_transfer.storage.activations_write import ActivationWriter, WriterConfig

    n, d = acts_ND.shape
    meta = {"model_id": "bench", "hook": "blocks.0.hook_resid_pre", "d_model": d, "dtype": "float32",
            "n_tokens": n, "context_size": 128}
    writer = ActivationWriter(path, meta, WriterConfig(checksum=False))
    rows = np.arange(n)
    writer.append(rows // 128, (rows % 128).astype(np.int32), np.zeros(n, np.int32), np.ones(n, np.uint8),
                  acts_ND.norm(dim=-1).numpy(), acts_ND.contiguous().numpy().view(np.uint8))
    writer.finish()
    return path


def parquet_factory(path: Path, B: int):
    from sae_transfer.storage.activations_read import ActivationReader

    return lambda start: ActivationReader(path, batch_size=B, buffer_tokens=8 * B, start_batch=start)


def state_bytes(D: int, F: int, B: int, dtype: str) -> str:
    """Bytes of fp32 weights, their grads, Adam's two moments, and the [B, F] activation buffers."""
    weights = 4 * (2 * D * F + F + D)
    act = (2 if dtype == "bfloat16" else 4) * B * F * 3  # pre/feats/grad buffers of the widest step
    return (f"weights {weights / 2**30:.2f} GiB, grads {weights / 2**30:.2f}, Adam {2 * weights / 2**30:.2f}, "
            f"[B,F] buffers ~{act / 2**30:.2f} GiB ({dtype})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x2048,256x4096")
    ap.add_argument("--archs", default="relu,jumprelu,topk,batchtopk")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precisions", default=None, help="comma list of fp32, tf32, bf16 (default: fp32 on CPU, all three on CUDA)")
    ap.add_argument("--sparse-kernels", default="auto", help="comma list of auto, csr, dense")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-parquet", action="store_true", help="skip the Parquet-vs-memory comparison")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precisions = (args.precisions or ("fp32,tf32,bf16" if device.type == "cuda" else "fp32")).split(",")
    B, rows = args.batch, []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, batch {B}, k {args.k}")
    print(f"{'shape':>11} {'arch':>9} {'prec':>4} {'kern':>5} {'tok/s':>9} {'FLOP/s':>9} {'matmul':>9} {'÷matmul':>8} "
          f"{'÷SAELens*':>9} {'peak GiB':>8}")
    for shape in args.shapes.split(","):
        D, F = (int(v) for v in shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        acts = (torch.randn(B * 12, D, generator=gen) * 3 + 1).to(device)  # already on the device, as SAELens's anchor
        mem = in_memory_factory(acts, B, check_finite=False)
        for prec in precisions:
            dtype, tf32 = PRECISIONS[prec]
            set_tf32(device, tf32)
            tf32_state = (f"allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                          f"float32_matmul_precision={torch.get_float32_matmul_precision()}")
            print(f"{shape} {prec}: {tf32_state}; {state_bytes(D, F, B, dtype)}")
            mm = matmul_flops(B, D, F, device, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
            for arch in args.archs.split(","):
                kernel_list = args.sparse_kernels.split(",")
                for kernels in kernel_list[:1] if arch == "relu" else kernel_list:  # relu: one (dense) path
                    cfg = TrainConfig(arch=arch, d_sae=F, k=args.k, batch_size=B, total_tokens=B * (args.steps + 1000),
                                      l1_coefficient=1.0, scale_estimate_tokens=B, log_every_steps=10_000,
                                      device=str(device), dtype=dtype, tf32=tf32, sparse_kernels=kernels)
                    step_s, n_active, peak = time_training(cfg, mem, D, args.k, args.steps)
                    resolved = ("dense" if arch == "relu" else kernels if kernels != "auto"
                                else ("dense" if device.type == "cuda" else "csr"))
                    flops = step_flops(arch, resolved, B, D, F, n_active) / step_s
                    tok_s = B / step_s
                    ref = SAELENS_RECORDED.get((device.type, D, F, arch, prec), float("nan"))
                    rows.append(dict(shape=shape, arch=arch, precision=prec, kernels=resolved, tokens_per_s=tok_s,
                                     flops=flops, matmul_flops=mm, ratio_matmul=flops / mm, ratio_saelens_recorded=tok_s / ref,
                                     peak_gib=peak, device=name))
                    print(f"{shape:>11} {arch:>9} {prec:>4} {resolved:>5} {tok_s:9.0f} {_si(flops):>9} {_si(mm):>9} "
                          f"{flops / mm:8.2f} {tok_s / ref:9.2f} {peak:8.1f}")
        if device.type == "cpu" and not args.no_parquet and "relu" in args.archs.split(","):
            cfg = TrainConfig(arch="relu", d_sae=F, batch_size=B, total_tokens=B * (args.steps + 1000), l1_coefficient=1.0,
                              scale_estimate_tokens=B, log_every_steps=10_000, device="cpu")
            with tempfile.TemporaryDirectory() as tmp:
                path = write_parquet_cache(Path(tmp) / "acts", acts.cpu())
                t_mem = time_training(cfg, mem, D, args.k, args.steps)[0]
                t_pq = time_training(dataclasses.replace(cfg), parquet_factory(path, B), D, args.k, args.steps)[0]
            rows.append(dict(shape=shape, arch="relu", parquet_over_memory=t_mem / t_pq))
            print(f"{shape:>11} relu: tokens/s from Parquet ÷ from memory = {t_mem / t_pq:.2f}")
    print("* ÷SAELens divides by SAELens 6 figures recorded elsewhere (not measured in this run):")
    for (dev, D, F, arch, prec), tok in SAELENS_RECORDED.items():
        print(f"    {dev} {D}x{F} {arch} {prec}: {tok} tok/s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
