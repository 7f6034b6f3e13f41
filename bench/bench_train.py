"""Training throughput of every SAE architecture, as ratios measured within one run.

For each shape (d_in × d_sae) and architecture it reports tokens/s, achieved FLOP/s (a dense
step counted as 12·B·d_in·d_sae FLOP, whatever the architecture really does) divided by this
machine's dense matmul FLOP/s measured in the same run at the same shapes, the ratio to
SAELens 6's own trainer (numbers measured on the 2-core development machine, in-memory
activations, batch 4096, ReLU SAE), and training from the Parquet cache ÷ from memory.

    python bench/bench_train.py                       # both reference shapes, all architectures
    python bench/bench_train.py --shapes 128x2048 --archs relu,topk --steps 6

Absolute numbers move with machine load; compare ratios from one run (check `uptime` first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_transfer.training import TrainConfig
from sae_transfer.training.loop import train_step
from sae_transfer.training.run import fresh_run
from sae_transfer.training.sources import in_memory_factory

# SAELens 6 trainer, ReLU SAE, batch 4096, in-memory activations, same 2-core machine:
# (d_in, d_sae) -> (tokens/s, its achieved ÷ matmul FLOP/s)
SAELENS_REFERENCE = {(128, 2048): (12_600, "0.51"), (256, 4096): (4_200, "0.65-0.76")}


def matmul_flops(B: int, D: int, F: int, repeats: int = 3) -> float:
    """Dense matmul FLOP/s at the three matmul shapes of an SAE step (best of `repeats`)."""
    x, W, f, g = torch.randn(B, D), torch.randn(D, F), torch.randn(B, F), torch.randn(B, D)
    out_BF, out_DF, out_BD = torch.empty(B, F), torch.empty(D, F), torch.empty(B, D)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.mm(x, W, out=out_BF)
        torch.mm(f, W.T, out=out_BD)
        torch.mm(g.T, f, out=out_DF)
        best = min(best, time.perf_counter() - t0)
    return 3 * 2 * B * D * F / best


def time_training(arch: str, source_factory, D: int, F: int, B: int, k: int, steps: int) -> float:
    """Seconds per step (median over `steps` after 2 warm-up steps), data loading included."""
    cfg = TrainConfig(arch=arch, d_sae=F, k=k, batch_size=B, total_tokens=B * (steps + 1000),
                      l1_coefficient=1.0, scale_estimate_tokens=B, log_every_steps=10_000)
    run = fresh_run(cfg, source_factory, D, None)
    batches = iter(source_factory(0))
    if arch == "jumprelu":  # steady state: thresholds that leave about k active latents per token
        with torch.no_grad():
            pre_BF = run.sae.pre_acts(next(iter(source_factory(0))) * run.state.scale_factor)
            run.sae.threshold.copy_(pre_BF.quantile(1 - k / F, dim=0).clamp_min(1e-3))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        train_step(run, next(batches))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_parquet_cache(path: Path, acts_ND: torch.Tensor) -> Path:
    """A float32 activation dataset holding acts_ND, through the cache writer."""
    from storage.activations_write import ActivationWriter, WriterConfig

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
    from storage.activations_read import ActivationReader

    return lambda start: ActivationReader(path, batch_size=B, buffer_tokens=8 * B, start_batch=start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x2048,256x4096")
    ap.add_argument("--archs", default="relu,jumprelu,topk,batchtopk")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-parquet", action="store_true", help="skip the Parquet-vs-memory comparison")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, rows = args.batch, []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, k {args.k}")
    print(f"{'shape':>10} {'arch':>10} {'tok/s':>9} {'FLOP/s':>9} {'matmul':>9} {'÷matmul':>8} {'÷SAELens':>9}")
    for shape in args.shapes.split(","):
        D, F = (int(v) for v in shape.split("x"))
        acts = torch.randn(B * 12, D) * 3 + 1
        mem = in_memory_factory(acts, B)
        for arch in args.archs.split(","):
            mm = matmul_flops(B, D, F)
            step_s = time_training(arch, mem, D, F, B, args.k, args.steps)
            mm = max(mm, matmul_flops(B, D, F))
            tok_s, flops = B / step_s, 12 * B * D * F / step_s
            ref = SAELENS_REFERENCE.get((D, F), (float("nan"), ""))[0]
            rows.append(dict(shape=shape, arch=arch, tokens_per_s=tok_s, flops=flops, matmul_flops=mm,
                             ratio_matmul=flops / mm, ratio_saelens=tok_s / ref))
            print(f"{shape:>10} {arch:>10} {tok_s:9.0f} {flops / 1e9:8.1f}G {mm / 1e9:8.1f}G "
                  f"{flops / mm:8.2f} {tok_s / ref:9.2f}")
        if not args.no_parquet and "relu" in args.archs.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                path = write_parquet_cache(Path(tmp) / "acts", acts)
                t_mem = time_training("relu", mem, D, F, B, args.k, args.steps)
                t_pq = time_training("relu", parquet_factory(path, B), D, F, B, args.k, args.steps)
            rows.append(dict(shape=shape, arch="relu", parquet_over_memory=t_mem / t_pq))
            print(f"{shape:>10} relu: tokens/s from Parquet ÷ from memory = {t_mem / t_pq:.2f}")
    for (D, F), (tok, ratio) in SAELENS_REFERENCE.items():
        print(f"SAELens 6 reference {D}x{F}: {tok} tok/s ({ratio} of matmul FLOP/s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
