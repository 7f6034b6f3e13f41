"""Live-activation training throughput against its two parts, measured in one run.

Prints forward tokens/s (the model over the corpus to the hook, as the live source runs it),
training tokens/s (the same SAE on the same activations held in memory), live tokens/s (the
SAE trained from the live source) and the ratio live / (1 / (1/forward + 1/train)): the
pipeline with no overlap between forward and training runs at that harmonic rate, so 1.0
means the live source adds nothing on top of the two parts' own costs.

    python bench/bench_live.py --model path/to/hf-folder --hook blocks.1.hook_resid_pre
    python bench/bench_live.py --model m --hook h --corpus data.jsonl --tokens 200k --device cuda
    python bench/bench_live.py --d-model 4096 --mlp 14336 --kv-heads 8 --vocab 32000 --dtype bfloat16 \
        --hook blocks.16.hook_resid_pre --device cuda     # random Mistral-7B shape, its first 16 blocks

Absolute numbers move with machine load; compare the ratio (check `uptime` first).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from sae_transfer.models import load_model
from sae_transfer.training.config import TrainConfig
from sae_transfer.training.live import open_live_data
from sae_transfer.training.run import train_sae
from sae_transfer.training.sources import in_memory_factory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder or Hub id; or build a random Llama with --d-model")
    ap.add_argument("--hook", required=True)
    ap.add_argument("--d-model", type=int, default=None, help="build a random Llama of this width (instead of --model)")
    ap.add_argument("--layers", type=int, default=None, help="layers of the built Llama (default: the hook's block + 1)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary of the built Llama (default: its tokenizer's)")
    ap.add_argument("--mlp", type=int, default=None, help="MLP width of the built Llama (default 4 * d_model)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads of the built Llama (default d_model // 64)")
    ap.add_argument("--kv-heads", type=int, default=None, help="KV heads of the built Llama (default: as many as heads)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--corpus", default="stdlib")
    ap.add_argument("--tokens", type=int, default=131_072, help="training tokens per measurement")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--buffer-tokens", type=int, default=32_768)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--group", type=int, default=3, help="also train this many SAEs (k = 32, 64, 128) from one stream, "
                    "against one; 1: skip")
    args = ap.parse_args()
    if (args.model is None) == (args.d_model is None):
        ap.error("pass --model or --d-model (a random Llama), not both")

    with tempfile.TemporaryDirectory() as build_dir:
        if args.model:
            model = load_model(args.model, device=args.device, dtype=args.dtype)
        else:  # random weights built on the device in the model dtype; only config + tokenizer on disk
            from _random_llama import boot, random_llama

            from sae_transfer.models import layer_of

            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests._tiny
            from tests._tiny import build_tokenizer

            layers = args.layers or (layer_of(args.hook) or 0) + 1
            hf_model = random_llama(Path(build_dir), build_tokenizer(4096), d_model=args.d_model, layers=layers,
                                    vocab=args.vocab, mlp=args.mlp, heads=args.heads, kv_heads=args.kv_heads,
                                    max_positions=max(2048, args.context_size), device=args.device, dtype=args.dtype,
                                    special_ids=True)
            model = boot(Path(build_dir), hf_model, args.device, args.dtype)
        run_bench(model, args)


def run_bench(model, args) -> None:
    data = open_live_data(model, args.hook, args.corpus, args.batch_size, buffer_tokens=args.buffer_tokens,
                          context_size=args.context_size, n_tokens=args.tokens, model_dtype=args.dtype)
    live = data.live
    cfg = TrainConfig(arch=args.arch, d_sae=args.expansion * data.d_in, k=32, batch_size=args.batch_size,
                      total_tokens=args.tokens, checkpoint_every_tokens=0, log_every_steps=10**9,
                      scale_estimate_tokens=min(65_536, args.tokens), device=args.device)

    # forward: every chunk of one epoch, timed; the activations are then the in-memory training data
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    chunks = [live._chunk(g)[args.hook] for g in range(live.chunks_per_epoch)]
    sync()
    fwd = live.forward_tokens_run / (time.perf_counter() - t0)
    acts_ND = torch.cat([c.cpu() for c in chunks])
    live._chunks.clear()

    with tempfile.TemporaryDirectory() as tmp:
        mem = train_sae(cfg, in_memory_factory(acts_ND, args.batch_size), data.d_in, Path(tmp) / "mem", progress=False)
        train = json.loads(mem.run_json.read_text())["timings"]["tokens_per_s"]
        fresh = open_live_data(model, args.hook, args.corpus, args.batch_size, buffer_tokens=args.buffer_tokens,
                               context_size=args.context_size, n_tokens=args.tokens, model_dtype=args.dtype)
        run = train_sae(cfg, fresh.make_source, data.d_in, Path(tmp) / "live", progress=False)
        live_tps = json.loads(run.run_json.read_text())["timings"]["tokens_per_s"]
        quality = {name: {k: r.metrics.get(k) for k in ("explained_variance", "l0", "dead_fraction_final")}
                   for name, r in (("in_memory", mem), ("live", run))}
    bound = 1 / (1 / fwd + 1 / train)
    print(f"device {args.device}  d_in {data.d_in}  d_sae {cfg.d_sae}  {args.arch}  batch {args.batch_size}  "
          f"buffer {args.buffer_tokens}  tokens {args.tokens}")
    print(f"forward  {fwd:12,.0f} tok/s")
    print(f"train    {train:12,.0f} tok/s")
    print(f"live     {live_tps:12,.0f} tok/s")
    print(f"live / (1/(1/fwd + 1/train)) = {live_tps / bound:.3f}")
    for name, q in quality.items():  # the same tokens, shuffled by each source's own buffer
        print(f"{name:9s} final EV {q['explained_variance']:.4f}  L0 {q['l0']:.1f}  dead {q['dead_fraction_final']:.3f}")
    dev = torch.device(args.device)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    if peak is not None:
        print(f"peak GPU memory (torch.cuda.max_memory_allocated): {peak:.1f} GiB")
    group = run_group(model, args, cfg) if args.group > 1 else None
    if args.json:
        args.json.write_text(json.dumps({"group": group,
            "bench": "live", "device": args.device, "d_in": data.d_in, "d_sae": cfg.d_sae, "arch": args.arch,
            "layers": model.cfg.n_layers, "dtype": args.dtype, "hook": args.hook, "batch": args.batch_size,
            "tokens": args.tokens, "forward_tokens_per_s": fwd, "train_tokens_per_s": train, "live_tokens_per_s": live_tps,
            "live_over_bound": live_tps / bound, "peak_gib": peak, "quality": quality}, indent=2))


def run_group(model, args, cfg) -> dict:
    """Per-batch cost of N SAEs from one stream against one: the stream's share (forward passes and
    buffer) and each SAE's steps, both measured in the same process; ideal N: forward + N steps."""
    import dataclasses

    from sae_transfer.training.api import LiveRun, train_live_group

    ks = [32 * 2**i for i in range(args.group)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, args.group):
            runs = [LiveRun(args.hook, dataclasses.replace(cfg, k=k), Path(tmp) / f"n{n}-k{k}") for k in ks[:n]]
            results = train_live_group(model, args.corpus, runs, context_size=args.context_size,
                                       buffer_tokens=args.buffer_tokens, model_dtype=args.dtype)
            timings = [json.loads(r.run_json.read_text())["timings"] for r in results]
            batches = timings[0]["group_batches"]
            out[n] = {"stream_ms": 1e3 * timings[0]["group_stream_s"] / batches,
                      "step_ms": [1e3 * t["group_member_step_s"] / batches for t in timings]}
    one, many = out[1], out[args.group]
    ideal = one["stream_ms"] + sum(many["step_ms"])
    actual = many["stream_ms"] + sum(many["step_ms"])
    print(f"\nseveral SAEs from one stream (k = {', '.join(map(str, ks))}), per batch of {args.batch_size}:")
    for n in (1, args.group):
        steps = " + ".join(f"{s:.1f}" for s in out[n]["step_ms"])
        print(f"  N={n}: stream {out[n]['stream_ms']:.1f} ms + steps {steps} ms")
    print(f"  N={args.group} / (one stream + its {args.group} steps) = {actual / ideal:.3f}   "
          f"(1.0: the stream is paid once; {args.group} separate runs would pay it {args.group}x)")
    return {"per_batch_ms": out, "n_over_ideal": actual / ideal}


if __name__ == "__main__":
    main()
