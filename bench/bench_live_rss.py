"""Host memory of live training against its token budget: peak RSS at T and at 10 T tokens.

Each budget trains one SAE live (`train_live`) in a fresh child process, which reports its own
peak resident set (`ru_maxrss`); the bench prints both and their ratio. A live run's host memory
should be bounded by its buffers (shuffle buffer, one refill, the model), so the ratio should stay
near 1 (goal: <= 1.2) however long it trains. The token sequences come from an on-disk token file
(`sae_transfer.token_file`), written by the child before training; its one-off write is not what
is measured, but it runs in the same process, so a tokenizer that held the whole budget in memory
would show here.

    python bench/bench_live_rss.py --model artifacts/demo-models/base --hook blocks.2.hook_resid_pre
    python bench/bench_live_rss.py --model M --hook H --tokens 200k --factor 10 --corpus data.jsonl

Absolute numbers move with machine load; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def child(args) -> None:
    from sae_transfer.training.api import train_live
    from sae_transfer.training.config import TrainConfig

    cfg = TrainConfig(arch="topk", d_sae=args.d_sae, k=32, batch_size=args.batch_size, total_tokens=args.tokens,
                      checkpoint_every_tokens=0, log_every_steps=10**9, device="cpu", num_threads=args.threads)
    result = train_live(args.model, args.hook, args.corpus, Path(args.out), cfg, context_size=args.context_size,
                        buffer_tokens=args.buffer_tokens)
    timings = json.loads(result.run_json.read_text())["timings"]
    print(json.dumps({"tokens": args.tokens, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "tokens_per_s": timings["tokens_per_s"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--hook", required=True)
    ap.add_argument("--corpus", default="stdlib")
    ap.add_argument("--tokens", type=int, default=100_000, help="the small budget T")
    ap.add_argument("--factor", type=int, default=10, help="the large budget is factor x T")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--buffer-tokens", type=int, default=32_768)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in (args.tokens, args.factor * args.tokens):
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--hook", args.hook, "--corpus", args.corpus,
                   "--tokens", str(tokens), "--context-size", str(args.context_size), "--buffer-tokens",
                   str(args.buffer_tokens), "--batch-size", str(args.batch_size), "--d-sae", str(args.d_sae),
                   "--threads", str(args.threads), "--out", str(Path(tmp) / f"run-{tokens}")]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for row in rows:
        print(f"{row['tokens']:>12,} tokens: peak RSS {row['max_rss_mib']:8.0f} MiB, {row['tokens_per_s']:10,.0f} tok/s")
    print(f"peak RSS at {args.factor} x the tokens / at 1 x = {rows[1]['max_rss_mib'] / rows[0]['max_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
