"""Max-activating examples: throughput against the SAE's own encoder, and memory as tokens grow.

One run prints two figures (issue 10's speed bar):

1. throughput ratio = tokens/s of the whole `examples_tables` call (pass 1 streaming the Parquet
   cache with the running top-k and histogram, pass 2 over the winners' windows, the Arrow
   tables) ÷ tokens/s of `sae.encode` alone on as many tokens already in memory, same batch
   size and device, timed in the same process just before and after (the faster of the two).
   Goal: ≥ 0.5. Pass 1 alone is printed too. Small runs pay a fixed start-up (the first batches
   fill every latent's top-k); the larger run shows the streaming rate.
2. peak RSS of a fresh process running `examples_tables` on N tokens and on scale × N tokens
   (separate caches, same SAE): memory is O(d_sae × k), so the two should be close whatever N.

The SAE is a JumpReLU (the form BatchTopK SAEs are saved in) with random unit encoder columns
and a threshold set for about `--l0` active latents per token; activations are Gaussian, stored
as float16 like a real cache.

    python bench/bench_examples.py                       # CPU defaults: 40k and 400k tokens, 256 x 4096
    python bench/bench_examples.py --device cuda --d-model 2048 --d-sae 32768 --tokens 200k

Absolute numbers move with machine load; compare the ratio and the two RSS figures of one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOOK = "blocks.6.hook_resid_pre"


def make_sae(d_model: int, d_sae: int, l0: int, seed: int = 0):
    """A JumpReLU SAE whose per-latent threshold leaves about `l0` latents active per token."""
    from sae_transfer.sae import JumpReluSAE, SAEConfig

    gen = torch.Generator().manual_seed(seed)
    sae = JumpReluSAE(SAEConfig("jumprelu", d_model, d_sae, metadata={"hook_name": HOOK}))
    with torch.no_grad():
        W = torch.nn.functional.normalize(torch.randn(d_model, d_sae, generator=gen), dim=0)
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W.T)
        # pre-activations of N(0, I) inputs are N(0, 1): the (1 - l0/F) quantile keeps ~l0 per token
        sae.threshold.fill_(float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - l0 / d_sae))))
    return sae


def write_cache(path: Path, n_tokens: int, d_model: int, seq_len: int = 128, seed: int = 1) -> Path:
    """A float16 activation cache of Gaussian rows, written in chunks (bounded memory)."""
    from sae_transfer.storage.activations_write import ActivationWriter, WriterConfig

    meta = {"model_id": "bench", "hook": HOOK, "d_model": d_model, "dtype": "float16", "n_tokens": n_tokens,
            "context_size": seq_len, "prepend_bos": True}
    writer = ActivationWriter(path, meta, WriterConfig(checksum=False))
    gen = torch.Generator().manual_seed(seed)
    step = seq_len * 256
    for r0 in range(0, n_tokens, step):
        rows = np.arange(r0, min(n_tokens, r0 + step))
        acts = torch.randn(len(rows), d_model, generator=gen).half()
        pos = (rows % seq_len).astype(np.int32)
        writer.append(rows // seq_len, pos, (rows % 5000).astype(np.int32), np.where(pos == 0, 0, 1).astype(np.uint8),
                      acts.float().norm(dim=-1).numpy(), acts.numpy().view(np.uint8))
    writer.finish()
    return path


def _loaded(sae):
    from sae_transfer.evals.loading import LoadedSAE

    return LoadedSAE(sae, {"sae_id": "bench:0", "sae_model": "bench", "sae_finetuned_from": None}, None, "bench")


def run_examples(cache: Path, sae, cfg) -> dict:
    """Time pass 1 alone, then the whole examples_tables call."""
    from sae_transfer.diffing import api
    from sae_transfer.diffing.examples import collect_max_acts
    from sae_transfer.diffing.latent_stats import applied_sae

    info = api.cache_info(cache)
    used, _ = applied_sae(sae, info["scale"], api.device_of(cfg.device))
    t0 = time.perf_counter()
    acts = collect_max_acts(used, api.row_stream(cache, cfg.batch_tokens, ()), cfg)
    _sync(cfg.device)
    pass1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    table, hist = api.examples_tables(_loaded(sae), cache, "chat", cfg, (), tokenizer=None)
    _sync(cfg.device)
    full = time.perf_counter() - t0
    return {"tokens": acts.n_tokens, "pass1_s": pass1, "full_s": full, "rows": table.num_rows, "hist_rows": hist.num_rows}


def encode_only(sae, n_tokens: int, d_model: int, cfg) -> float:
    """Seconds `sae.encode` takes over n_tokens Gaussian tokens held in memory, same batches."""
    device = torch.device(cfg.device or "cpu")
    sae = sae.to(device)
    x = torch.randn(cfg.batch_tokens, d_model, generator=torch.Generator().manual_seed(2)).half().to(device)
    with torch.inference_mode():
        sae.encode(x.float())  # warm-up
        _sync(cfg.device)
        t0 = time.perf_counter()
        for _ in range(0, n_tokens, cfg.batch_tokens):
            sae.encode(x.float())
        _sync(cfg.device)
    return time.perf_counter() - t0


def _sync(device) -> None:
    if device and torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))  # that GPU, not the current one


def _config(args):
    from sae_transfer.diffing.examples import ExamplesConfig

    return ExamplesConfig(k=args.k, batch_tokens=args.batch_tokens, device=args.device)


def child(args) -> None:
    """In this (fresh) process: encode-only, then examples on one cache, then encode-only again
    (the best of the two brackets the examples run, so machine load shifts both alike); print
    the timings and the peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    sae, cfg = make_sae(args.d_model, args.d_sae, args.l0), _config(args)
    n = int(json.loads((Path(args.child) / "_manifest.json").read_text())["n_tokens"])
    before = encode_only(sae, n, args.d_model, cfg)
    out = run_examples(Path(args.child), sae, cfg)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["encode_s"] = min(before, encode_only(sae, n, args.d_model, cfg))
    print(json.dumps(out))


def _tokens(text: str) -> int:
    low = text.lower()
    scale = {"k": 10**3, "m": 10**6}.get(low[-1:], 1)
    return int(float(low[:-1] if scale > 1 else low) * scale)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=_tokens, default=40_000, help="tokens of the small cache (e.g. 40k)")
    p.add_argument("--scale", type=int, default=10, help="the large cache has scale x tokens")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--l0", type=int, default=64, help="active latents per token (threshold set for it)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--device", default=None, help="cpu, cuda (default: CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"shape {args.d_model} x {args.d_sae}, l0 ~{args.l0}, k {args.k}, batch {args.batch_tokens}, "
          f"device {args.device or 'cpu'}, threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for n in (args.tokens, args.tokens * args.scale):
            cache = write_cache(Path(tmp) / f"cache-{n}", n, args.d_model)
            cmd = [sys.executable, __file__, "--child", str(cache), "--d-model", str(args.d_model), "--d-sae", str(args.d_sae),
                   "--l0", str(args.l0), "--k", str(args.k), "--batch-tokens", str(args.batch_tokens),
                   "--threads", str(args.threads)] + (["--device", args.device] if args.device else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        small = results[args.tokens]
    for n, r in results.items():
        enc = r["tokens"] / r["encode_s"]
        whole, pass1 = r["tokens"] / r["full_s"], r["tokens"] / r["pass1_s"]
        print(f"{n:>9} tokens: encode only (in memory) {enc:>7.0f} tok/s; whole call {whole:>7.0f} tok/s = "
              f"{whole / enc:.2f} x encode only (goal >= 0.5); pass 1 alone {pass1 / enc:.2f} x; {r['rows']} example rows")
    big = results[args.tokens * args.scale]
    print(f"peak RSS: {small['peak_rss_mib']:.0f} MiB at {args.tokens} tokens, {big['peak_rss_mib']:.0f} MiB at "
          f"{args.tokens * args.scale} tokens ({args.scale}x tokens: {big['peak_rss_mib'] / small['peak_rss_mib']:.2f}x memory)")


if __name__ == "__main__":
    main()
