"""Benchmark the activation cache; every number is measured within this one run.

Prints:
  1. `act` layout: fixed_size_binary vs fixed-size list, write and read MB/s on the same data.
  2. writer MB/s and bytes per token on disk (synthetic d_model 512, float16 and float32).
  3. ActivationReader throughput through the shuffle buffer into float32 torch batches on
     --device, from a warm page cache (MB/s of stored bytes and tokens/s).
  4. reader peak RSS for a dataset 1x vs 10x as large (subprocesses, ru_maxrss).
  5. caching tokens/s divided by bare forward tokens/s on the same model, tokens, device, dtype
     and attention implementation, with the full forward pass and with the pass stopped after
     the deepest hook, for one and for several hooks.

    python bench/bench_cache.py [--model DIR] [--threads 1] [--quick]
    python bench/bench_cache.py --device cuda --dtype bfloat16 --d-model 2048 --layers 16 \
        --context 2048 --tokens 131072 --batch-tokens 16384 --sections 3,5

Without --model a Llama of --d-model / --layers (default 256 x 4, random weights) is built
directly on --device in --dtype (only its config and tokenizer go to a temp folder; no weights
are written). The Mistral-7B shape: --d-model 4096 --layers 32 --vocab 32000 --mlp 14336
--heads 32 --kv-heads 8. `make bench` runs the CPU defaults.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae_transfer.storage.activations_read import ActivationReader  # noqa: E402
from sae_transfer.storage.activations_write import ActivationWriter, WriterConfig  # noqa: E402


def best_of(fn, reps: int = 3) -> float:
    """Fastest wall time (s) of `reps` calls: the machine is shared, the minimum is the signal."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def synthetic(path: Path, n_rows: int, d_model: int, dtype: str, shard_bytes: int = 128 << 20) -> float:
    """Write a synthetic dataset with ActivationWriter; returns the write time in seconds."""
    meta = {"model_id": "synthetic", "hook": "blocks.0.hook_resid_pre", "d_model": d_model, "dtype": dtype,
            "n_tokens": n_rows, "context_size": 128}
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    chunk = 16384
    block = torch.randn(chunk, d_model).to(tdt)
    raw = (block.view(torch.int16) if dtype == "bfloat16" else block).numpy().view(np.uint8)
    norms = torch.linalg.vector_norm(block.float(), dim=1).numpy()
    t0 = time.perf_counter()
    writer = ActivationWriter(path, meta, WriterConfig(shard_bytes=shard_bytes))
    for r0 in range(0, n_rows, chunk):
        m = min(chunk, n_rows - r0)
        rows = np.arange(r0, r0 + m)
        writer.append(rows // 128, (rows % 128).astype(np.int32), (rows % 1000).astype(np.int32),
                      np.where(rows % 128 == 0, 0, 1).astype(np.uint8), norms[:m], raw[:m])
    writer.finish()
    return time.perf_counter() - t0


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.parquet"))


def warm(path: Path) -> None:
    for f in path.glob("*.parquet"):
        f.read_bytes()


def bench_layouts(tmp: Path, n: int, d: int) -> None:
    """fixed_size_binary vs fixed_size_list(float16) for the same vectors."""
    acts = torch.randn(n, d).half().numpy()
    as_binary = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * d), n, [None, pa.py_buffer(acts)])
    as_list = pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), d)
    mb = acts.nbytes / 1e6
    print(f"\n[1] act layout, {n} x {d} float16 ({mb:.0f} MB), uncompressed Parquet")
    for name, arr in (("fixed_size_binary", as_binary), ("fixed_size_list", as_list)):
        path = tmp / f"layout_{name}.parquet"
        table = pa.table({"act": arr})
        t_w = best_of(lambda table=table, path=path: pq.write_table(table, path, compression="NONE", use_dictionary=False,
                                                                    write_statistics=False, row_group_size=16384), 2)
        warm(tmp)

        def read(path=path, name=name):
            col = pq.read_table(path, use_threads=False).column("act").combine_chunks()
            if name == "fixed_size_binary":
                np.frombuffer(col.buffers()[1], np.float16).reshape(n, d)
            else:
                col.flatten().to_numpy().reshape(n, d)

        t_r = best_of(read, 3)
        print(f"    {name:18s} write {mb / t_w:7.0f} MB/s   read+decode {mb / t_r:7.0f} MB/s   "
              f"file {path.stat().st_size / n:.0f} B/token")


def bench_reader(tmp: Path, n_rows: int, d: int, device: str = "cpu") -> None:
    print(f"\n[2] writer and [3] reader, synthetic d_model {d}; batches of 4096 float32 rows on {device}")
    for dtype, itemsize in (("float16", 2), ("float32", 4)):
        rows = n_rows if dtype == "float16" else n_rows // 2
        path = tmp / f"ds_{dtype}"
        t_w = synthetic(path, rows, d, dtype)
        mb = rows * d * itemsize / 1e6
        print(f"    {dtype}: {rows} tokens, {mb:.0f} MB of vectors; writer {mb / t_w:.0f} MB/s; "
              f"{disk_bytes(path) / rows:.1f} bytes/token on disk (vector: {d * itemsize})")
        warm(path)
        files = [str(f) for f in sorted(path.glob("*.parquet"))]
        t_pq = best_of(lambda files=files: [pq.read_table(f, columns=["act"], memory_map=True, use_threads=False)
                                            for f in files], 3)
        print(f"      reference, bare pq.read_table of the act column: {mb / t_pq:7.0f} MB/s")
        for buffer_tokens in (65536, 262144):
            def read_epoch(path=path, buffer_tokens=buffer_tokens):
                for _ in ActivationReader(path, batch_size=4096, buffer_tokens=buffer_tokens, epochs=1, device=device):
                    pass
                sync(device)
            t_r = best_of(read_epoch, 3)
            used = (rows // 4096) * 4096
            print(f"      reader buffer {buffer_tokens:6d}: {used * d * itemsize / 1e6 / t_r:7.0f} MB/s stored, "
                  f"{used / t_r:9.0f} tokens/s")
        for f in path.glob("*.parquet"):
            f.unlink()


_RSS = """
import json, resource, sys
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)
from sae_transfer.storage.activations_read import ActivationReader
n = 0
for acts in ActivationReader(sys.argv[1], batch_size=4096, buffer_tokens=32768, epochs=1):
    n += acts.shape[0]
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": n, "maxrss_mb": kb / 1024}))
"""


def bench_rss(tmp: Path, n_small: int, d: int) -> None:
    print(f"\n[4] reader peak RSS (buffer 32768 tokens = {32768 * d * 2 >> 20} MiB, d_model {d} float16)")
    out = {}
    for scale in (1, 10):
        path = tmp / f"rss_{scale}"
        synthetic(path, n_small * scale, d, "float16")
        res = subprocess.run([sys.executable, "-c", _RSS, str(path), str(ROOT)], capture_output=True, text=True, check=True)
        out[scale] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"    {scale:2d}x: {n_small * scale} tokens ({disk_bytes(path) / 1e6:.0f} MB on disk): "
              f"peak RSS {out[scale]['maxrss_mb']:.0f} MB")
        for f in path.glob("*.parquet"):
            f.unlink()
    print(f"    ratio 10x/1x: {out[10]['maxrss_mb'] / out[1]['maxrss_mb']:.3f} (goal <= 1.2)")


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall times are honest (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))  # that GPU, not the current one


def bench_caching(tmp: Path, args) -> None:
    from sae_transfer import activations as A
    from sae_transfer.attention import attention_of
    from sae_transfer.corpus import CorpusConfig, tokenize_sequences
    from sae_transfer.models import load_model

    model_dir = args.model
    device, context = args.device, args.context
    if model_dir is None:  # random weights built on the device in the model dtype; only config + tokenizer on disk
        from _random_llama import boot, random_llama

        from tests._tiny import build_tokenizer

        model_dir = str(tmp / "bench-llama")
        hf_model = random_llama(Path(model_dir), build_tokenizer(4096), d_model=args.d_model, layers=args.layers,
                                vocab=args.vocab, mlp=args.mlp or 2 * args.d_model, heads=args.heads or 4,
                                kv_heads=args.kv_heads or (2 if not args.heads else None),
                                max_positions=max(512, context), device=device, dtype=args.dtype, special_ids=True)
        model = boot(Path(model_dir), hf_model, device, args.dtype, args.attn_implementation)
    else:
        model = load_model(model_dir, device=device, dtype=args.dtype, attn_implementation=args.attn_implementation)
    n_layers = model.cfg.n_layers
    corpus = CorpusConfig(max_docs=2000 if args.tokens <= 65536 else None)
    seqs = tokenize_sequences(corpus, model.tokenizer, context_size=context, n_tokens=args.tokens)
    batch_seqs = max(1, args.batch_tokens // context)
    print(f"\n[5] caching vs bare forward on {device} ({_device_name(device)}), model dtype {args.dtype}, "
          f"{attention_of(model)} attention: {Path(model_dir).name}, d_model {model.cfg.d_model}, {n_layers} layers, "
          f"vocab {model.cfg.d_vocab}, {seqs.n_tokens} tokens, context {context}, {batch_seqs * context} tokens/pass")

    def bare():
        with torch.inference_mode():
            for s0 in range(0, seqs.tokens_NS.shape[0], batch_seqs):
                model(seqs.tokens_NS[s0:s0 + batch_seqs].to(device), return_type=None)
        sync(device)

    def hf_forward():
        with torch.inference_mode():
            for s0 in range(0, seqs.tokens_NS.shape[0], batch_seqs):
                model.original_model(seqs.tokens_NS[s0:s0 + batch_seqs].to(device))
        sync(device)

    bare()  # warm-up (kernels, allocator)
    t_bare = best_of(bare, 2)
    t_hf = best_of(hf_forward, 2)
    print(f"    bare forward, bridge, no hooks : {seqs.n_tokens / t_bare:9.0f} tokens/s")
    print(f"    bare forward, HF model directly: {seqs.n_tokens / t_hf:9.0f} tokens/s")
    figures = {"bench": "cache", "device": _device_name(device), "d_model": model.cfg.d_model, "layers": n_layers,
               "vocab": model.cfg.d_vocab, "dtype": args.dtype, "tokens": seqs.n_tokens, "context": context,
               "bare_tokens_per_s": seqs.n_tokens / t_bare, "hf_tokens_per_s": seqs.n_tokens / t_hf, "cases": []}
    deep = f"blocks.{n_layers - 1}.hook_resid_post"
    mid = f"blocks.{n_layers // 2}.hook_resid_pre"
    store = "bfloat16" if args.dtype == "bfloat16" else "float32"
    cases = [
        ("last block, full pass", (deep,), False, store),
        ("mid + last block, full pass", (mid, deep), False, store),
        ("mid + last block, stop early", (mid, deep), True, store),
        ("mid + last block, bf16 storage", (mid, deep), True, "bfloat16"),
        ("two mid hooks, full pass", ("blocks.1.hook_resid_pre", mid), False, store),
        ("two mid hooks, stop early", ("blocks.1.hook_resid_pre", mid), True, store),
    ]
    for i, (label, hooks, stop, dtype) in enumerate(cases):
        cfg = A.CacheConfig(model=model_dir, hooks=hooks, corpus=corpus, n_tokens=seqs.n_tokens, context_size=context,
                            dtype=dtype, model_dtype=args.dtype, batch_tokens=batch_seqs * context, stop_early=stop,
                            device=device, attn_implementation=args.attn_implementation)
        metas = A.dataset_metas(cfg)
        counter = iter(range(100))

        def run(i=i, counter=counter, cfg=cfg, metas=metas, hooks=hooks):
            out = tmp / f"cache_{i}_{next(counter)}"
            A._write_datasets(model, seqs, cfg, metas, {h: out / h for h in hooks}, progress=False)

        def pair() -> tuple[float, float]:
            times = best_of(bare, 1), best_of(run, 1)
            for out in tmp.glob("cache_*"):  # untimed: keep the disk from filling over the runs
                shutil.rmtree(out)
            return times

        # pairs of (bare, cache) runs back to back; the median pair ratio resists load spikes
        pairs = [pair() for _ in range(3)]
        ratios = sorted(tb / tc for tb, tc in pairs)
        t_case = min(tc for _, tc in pairs)
        print(f"    {label:31s}: {seqs.n_tokens / t_case:9.0f} tokens/s, ratio to bare forward "
              f"{ratios[1]:5.2f} (median of 3 paired runs; goal >= 0.90)")
        figures["cases"].append({"case": label, "hooks": list(hooks), "stop_early": stop, "storage": dtype,
                                 "tokens_per_s": seqs.n_tokens / t_case, "ratio_to_bare": ratios[1], "goal": 0.90})
    from _random_llama import peak_gib

    figures["peak_gib"] = peak_gib(device)
    if figures["peak_gib"] is not None:
        print(f"    peak GPU memory (torch.cuda.max_memory_allocated): {figures['peak_gib']:.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF checkpoint folder (default: build a random Llama)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is stable on a shared box)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (model forward and reader batches)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--attn-implementation", default="auto", choices=["auto", "eager", "sdpa"],
                        help="attention kernel of the model (auto: SDPA on CUDA, eager on CPU)")
    parser.add_argument("--d-model", type=int, default=256, help="width of the built Llama")
    parser.add_argument("--layers", type=int, default=4, help="layers of the built Llama")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary of the built Llama (default: its tokenizer's)")
    parser.add_argument("--mlp", type=int, default=None, help="MLP width of the built Llama (default 2 * d_model)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads of the built Llama (default 4)")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads of the built Llama (default 2; with --heads: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write section [5]'s figures here")
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence in [5]")
    parser.add_argument("--tokens", type=int, default=16_384, help="tokens cached per run in [5]")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass in [5]")
    parser.add_argument("--sections", default="1,2,3,4,5", help="which sections to run, e.g. 5 or 3,5 ([2] runs with [3])")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = 0.25 if args.quick else 1.0
    if args.quick:
        args.tokens = int(args.tokens * scale)
    sections = {int(x) for x in args.sections.split(",")}
    print(f"torch {torch.__version__}, pyarrow {pa.__version__}, torch threads {torch.get_num_threads()}, "
          f"device {args.device} ({_device_name(args.device)})")
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        if 1 in sections:
            bench_layouts(tmp, int(300_000 * scale), 256)
        if sections & {2, 3}:
            bench_reader(tmp, int(300_000 * scale), 512, args.device)
        if 4 in sections:
            bench_rss(tmp, int(100_000 * scale), 256)
        if 5 in sections:
            bench_caching(tmp, args)
    print(f"\nbench peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
