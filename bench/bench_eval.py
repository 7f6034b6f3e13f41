"""Cost of a CE evaluation (clean + SAE-spliced + zero-ablated passes, losses, KL, bootstrap)
relative to one bare forward pass over the same tokens. Target: <= 3.3x.

    python bench/bench_eval.py [--d-model 256] [--layers 8] [--vocab 8192] [--tokens 8192] [--hook H]
    python bench/bench_eval.py --device cuda --dtype bfloat16 --d-model 4096 --layers 32 --context 1024 --tokens 16384

Builds a random Llama of the given size in a temporary folder (or pass --model DIR), evaluates
one random ReLU SAE at the middle layer's resid_pre, and prints the ratios measured in this run.
The bare forward runs on the same model object (same device, dtype and attention kernel).
`make bench` runs it on the CPU; --device cuda prints the same ratios on a GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def build_model(folder: Path, d_model: int, layers: int, vocab: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # a word-level vocabulary of `vocab` entries: only its size matters for the timing
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=layers,
                      num_attention_heads=max(1, d_model // 64), num_key_value_heads=max(1, d_model // 64),
                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


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
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or build_model(Path(tmp) / "bench-llama", args.d_model, args.layers, args.vocab)
        model = load_model(str(folder), device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation)
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


if __name__ == "__main__":
    main()
