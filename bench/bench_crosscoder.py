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
    python bench/bench_crosscoder.py --agreement --threads 1  # decoder agreement on an identical pair

Absolute numbers move with machine load; compare the ratio (check `uptime` first).

--agreement trains the same crosscoder twice on an identical pair (the same sparse activations
fed as base and as chat), once with each latent's two decoder rows drawn as one direction (what
the trainer does) and once drawn independently (what it did before, and dictionary_learning's
default), and prints the live latents' decoder cosines: median, minimum, share below 0.95.
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


def identical_pair_batches(D: int, n_features: int, B: int, seed: int = 0):
    """An endless stream of [B, 2D] batches whose two halves are the same sparse activations
    (features firing on 3e-4 .. 10 % of tokens, so some latents fire rarely)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n_features, D, generator=gen), dim=-1)
    rate = torch.logspace(-3.5, -1, n_features)
    while True:
        on = torch.rand(B, n_features, generator=gen) < rate
        x = (on * (0.5 + torch.rand(B, n_features, generator=gen))) @ feats + 0.01 * torch.randn(B, D, generator=gen)
        yield torch.cat([x, x], dim=-1)


def agreement(D: int, F: int, k: int, B: int, tokens: int, independent: bool, device: str | None) -> dict:
    """Train on an identical pair; the live latents' decoder cosine statistics."""
    from sae_transfer.diffing.crosscoder import latent_table

    train = TrainConfig(arch="batchtopk", d_sae=F, k=k, total_tokens=tokens, batch_size=B, lr=1e-3, lr_warmup_frac=0.05,
                        log_every_steps=10**9, dead_window_tokens=20_000, device=device)
    run = new_run(CrosscoderConfig(train=train), PairedCaches(None, None, "bench", D, B, 1.0, 1.0, {}))
    run.trainer.init_weights(torch.Generator().manual_seed(0), torch.zeros(2 * D))
    cc = run.sae
    if independent:  # the chat half redrawn: each model's row its own random direction of the same norm
        with torch.no_grad():
            dec_FMD = cc.W_dec.view(F, 2, D)
            dec_FMD[:, 1] = torch.nn.functional.normalize(torch.randn(F, D, generator=torch.Generator().manual_seed(1)),
                                                          dim=-1).to(dec_FMD) * dec_FMD[:, 0].norm(dim=-1, keepdim=True)
            cc.W_enc.copy_(cc.W_dec.T)
    stream = identical_pair_batches(D, 3 * D, B)
    for _ in range(train.total_steps):
        train_step(run, next(stream))
    with torch.no_grad():
        x = torch.cat([next(stream) for _ in range(8)]).to(cc.W_enc.device)
        alive = (cc.encode(x) > 0).any(0).cpu()
    cos = latent_table(cc.cpu()).cosine_F[alive]
    return {"alive": int(alive.sum()), "median": float(cos.median()), "min": float(cos.min()),
            "below_0.95": float((cos < 0.95).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x2048,256x4096", help="d_model x d_sae, comma separated")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default=None)
    ap.add_argument("--sparse-kernels", default="auto", choices=("auto", "csr", "dense"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--agreement", action="store_true", help="decoder agreement on an identical pair (module doc)")
    ap.add_argument("--agreement-shape", default="32x128x4", help="d_model x d_sae x k for --agreement")
    ap.add_argument("--agreement-tokens", type=int, default=300_000)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.agreement:
        D, F, k = (int(v) for v in args.agreement_shape.split("x"))
        for independent in (True, False):
            r = agreement(D, F, k, 512, args.agreement_tokens, independent, args.device)
            print(f"{'independent' if independent else 'one draw':>11} decoder rows: live {r['alive']}/{F}, decoder cosine "
                  f"median {r['median']:.3f}, min {r['min']:.3f}, {100 * r['below_0.95']:.0f}% below 0.95")
        return
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
