"""Cost of a CE evaluation (clean + SAE-spliced + zero-ablated passes, losses, KL, bootstrap)
relative to one bare forward pass over the same tokens. Target: <= 3.3x.

    python bench/bench_eval.py [--d-model 256] [--layers 8] [--vocab 8192] [--tokens 8192] [--hook H]
    python bench/bench_eval.py --device cuda --dtype bfloat16 --d-model 4096 --layers 32 --context 1024 --tokens 16384
    python bench/bench_eval.py ... --d-model 4096 --layers 32 --vocab 32000 --mlp 14336 --kv-heads 8   # Mistral-7B shape

Builds a random Llama of the given size directly on --device in --dtype (only its config and
tokenizer go to a temporary folder; or pass --model DIR), evaluates
one random ReLU SAE at the middle layer's resid_pre, and prints the ratios measured in this run.
The bare forward runs on the same model object (same device, dtype and attention kernel).
`make bench` runs it on the CPU; --device cuda prints the same ratios on a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def build_model(folder: Path, d_model: int, layers: int, vocab: int, *, mlp: int | None = None, kv_heads: int | None = None,
                device: str = "cpu", dtype: str = "float32"):
    """A random Llama (seed 0) built on `device` in `dtype`; only its config and tokenizer are
    written to `folder`. Returns (folder, model)."""
    from _random_llama import random_llama, word_level_tokenizer

    model = random_llama(folder, word_level_tokenizer(vocab), d_model=d_model, layers=layers, vocab=vocab, mlp=mlp,
                         kv_heads=kv_heads, device=device, dtype=dtype)
    return folder, model


def timed(fn) -> float:
    """Wall time of one call (seconds), synchronising every GPU around it (the model may be on
    any cuda:N, not only the current device)."""
    _sync_all()
    start = time.perf_counter()
    fn()
    _sync_all()
    return time.perf_counter() - start


def _sync_all() -> None:
    if torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def interleaved(fns: dict, repeats: int) -> list[dict[str, float]]:
    """Wall times of every function in each of `repeats` rounds (one warm-up call each first).
    Rounds interleave the functions, so load from other processes hits them alike."""
    for fn in fns.values():
        fn()
    return [{name: timed(fn) for name, fn in fns.items()} for _ in range(repeats)]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    from sae_transfer.attention import attention_of
    from sae_transfer.evals.transfer import EvalConfig, TokenSet, evaluate_saes, norm_pass
    from sae_transfer.models import load_model
    from sae_transfer.sae import ReluSAE, SAEConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    ap.add_argument("--attn-implementation", default="auto", choices=["auto", "eager", "sdpa"],
                    help="attention kernel (auto: SDPA on CUDA, eager on CPU)")
    ap.add_argument("--hook", default=None, help="default: the middle block's resid_pre")
    ap.add_argument("--mlp", type=int, default=None, help="MLP width of the built Llama (default 4 * d_model)")
    ap.add_argument("--kv-heads", type=int, default=None, help="KV heads of the built Llama (default: as many as heads)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = load_model(str(args.model), device=args.device, dtype=args.dtype,
                               attn_implementation=args.attn_implementation)
        else:  # built on the device in the model dtype; no weights written
            from _random_llama import boot

            folder, hf_model = build_model(Path(tmp) / "bench-llama", args.d_model, args.layers, args.vocab, mlp=args.mlp,
                                           kv_heads=args.kv_heads, device=args.device, dtype=args.dtype)
            model = boot(folder, hf_model, args.device, args.dtype, args.attn_implementation)
        d, n_layers, vocab = model.cfg.d_model, model.cfg.n_layers, model.cfg.d_vocab
        hook = args.hook or f"blocks.{n_layers // 2}.hook_resid_pre"
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (args.tokens // args.context, args.context), generator=gen)
        toks = TokenSet.plain(tokens, torch.ones_like(tokens, dtype=torch.uint8))
        sae = ReluSAE(SAEConfig("standard", d, 8 * d)).to(args.device)
        torch.nn.init.normal_(sae.W_enc, std=d**-0.5)
        sae.W_dec.data = sae.W_enc.data.T.clone()
        step = max(1, args.batch_tokens // args.context)

        def bare():
            with torch.inference_mode():
                for i in range(0, tokens.shape[0], step):
                    model(tokens[i : i + step].to(args.device), return_type="logits")

        one = EvalConfig(batch_tokens=args.batch_tokens, keep_token_errors=False, policies=("included",), device=args.device)
        both = EvalConfig(batch_tokens=args.batch_tokens, keep_token_errors=False, device=args.device)
        norms = norm_pass(model, toks, hook, one)
        rounds = interleaved({
            "bare": bare,
            "norm": lambda: norm_pass(model, toks, hook, one),
            "one": lambda: evaluate_saes(model, {"s": sae}, toks, hook, norms, one),
            "both": lambda: evaluate_saes(model, {"s": sae}, toks, hook, norms, both),
        }, args.repeats)

    where = torch.cuda.get_device_name(torch.device(args.device)) if torch.device(args.device).type == "cuda" else "cpu"
    print(f"model d_model={d} layers={n_layers} vocab={vocab} {args.dtype}, {tokens.numel()} tokens, hook {hook}, "
          f"device {args.device} ({where}), {attention_of(model)} attention")
    print(f"bare forward: median {median([r['bare'] for r in rounds]):.3f} s over {args.repeats} rounds")
    for name, label in [("one", "CE eval, one policy (clean + SAE + zero)"), ("both", "CE eval, both policies"),
                        ("norm", "norm pass (stops at the hook; once per model)")]:
        ratios = [r[name] / r["bare"] for r in rounds]
        print(f"{label:48s} median {median(ratios):.2f}x  (per-round ratios {', '.join(f'{x:.2f}' for x in ratios)})")
    print("target: CE eval, one policy <= 3.3x")
    from _random_llama import peak_gib

    peak = peak_gib(args.device)
    if peak is not None:
        print(f"peak GPU memory (torch.cuda.max_memory_allocated): {peak:.1f} GiB")
    if args.json:
        bare_s = median([r["bare"] for r in rounds])
        args.json.write_text(json.dumps({
            "bench": "eval", "device": where, "d_model": d, "layers": n_layers, "vocab": vocab, "dtype": args.dtype,
            "tokens": tokens.numel(), "hook": hook, "bare_s": bare_s, "bare_tokens_per_s": tokens.numel() / bare_s,
            "eval_one_tokens_per_s": tokens.numel() / median([r["one"] for r in rounds]),
            "eval_one_ratio": median([r["one"] / r["bare"] for r in rounds]),
            "eval_both_ratio": median([r["both"] / r["bare"] for r in rounds]),
            "norm_ratio": median([r["norm"] / r["bare"] for r in rounds]), "target_one_ratio": 3.3, "peak_gib": peak,
        }, indent=2))


if __name__ == "__main__":
    main()
