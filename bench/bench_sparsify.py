"""Live TopK SAE training, ours against EleutherAI's sparsify, side by side on the same tokens.

Both trainers run the model over the same tokenised sequences (the corpus's train split cut as
the project cuts it: `--context-size` tokens with BOS first) and train a TopK SAE (k 32, 16x
expansion) on every token's activation at the hook, with the same batch in tokens, on
`--threads` CPU threads, one after the other (never concurrently). Ours is
`sae_transfer.training.api.train_live` with our defaults otherwise (Adam, normalised
activations, AuxK, ...); sparsify's is its own `Trainer.fit()` with its defaults otherwise
(signum, no AuxK, no normalisation), run by bench/sparsify_live_driver.py under
`--sparsify-python` (an interpreter of a separate environment with `pip install eai-sparsify`;
never the project's). Each side's wall time covers its whole training call (model loading
excluded). Both SAEs are then measured on held-out documents (the corpus's eval split), on raw
activations: explained variance (DESIGN.md definition), L0 and the fraction of latents that never
fire there. A forward-only timing of the model to the hook shows the forward's share.

    python bench/bench_sparsify.py --sparsify-python /path/to/venv/bin/python --json sparsify.json
    python bench/bench_sparsify.py --tokens 100k --sparsify-python PY     # quick
    python bench/bench_sparsify.py --tokens 100k                          # ours only

The model defaults to the demo base model (`sae-transfer demo-models`; built here when absent,
after waiting `--wait-s` for a build already running). Absolute numbers move with machine load
(check `uptime`); compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae_transfer.corpus import CorpusConfig, tokenize_sequences
from sae_transfer.demo.config import DEFAULT_OUT, DEMO_HOOK
from sae_transfer.sae import metrics
from sae_transfer.training.live import FORWARD_TOKENS

DRIVER = Path(__file__).with_name("sparsify_live_driver.py")
GOAL_SPEED = 1.5  # ours / sparsify tokens/s the issue asks for


class _Stop(Exception):
    """Raised from the hook: the layers after it are not needed."""


def parse_count(text: str) -> int:
    """'1.2M', '100k' or '65536' as an int."""
    mult = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def model_folder(args) -> Path:
    """--model, or the demo base model (waited for up to --wait-s, then built if still absent)."""
    if args.model:
        return args.model
    base = DEFAULT_OUT / "base"
    deadline = time.monotonic() + args.wait_s
    while not (base / "config.json").is_file() and time.monotonic() < deadline:
        time.sleep(10)
    if not (base / "config.json").is_file():
        from sae_transfer.demo.build import build_demo_pair

        print(f"{base} is missing: building the demo pair", flush=True)
        build_demo_pair(DEFAULT_OUT)
    return base


@torch.no_grad()
def acts_to_hook(model, hook: str, ids_NS: torch.Tensor, forward_seqs: int) -> torch.Tensor:
    """[N * S, D] float32 activations at `hook`, in token order, in forward passes of
    `forward_seqs` sequences that stop at the hook (as the live source runs them)."""
    got = []

    def capture(acts, hook):
        got.append(acts.detach().float().reshape(-1, acts.shape[-1]).clone())
        raise _Stop

    for i in range(0, ids_NS.shape[0], forward_seqs):
        try:
            model.run_with_hooks(ids_NS[i : i + forward_seqs], return_type=None, fwd_hooks=[(hook, capture)])
        except _Stop:
            pass
    return torch.cat(got)


def export_tokens(args, model, work: Path) -> tuple[Path, Path, torch.Tensor]:
    """Write work/train.safetensors (the sequences train_live streams, the same token file) and
    work/eval.safetensors (held-out sequences), both `input_ids` [N, S] int64; returns both paths
    and the eval ids."""
    from sae_transfer.token_file import token_file

    corpus, S = CorpusConfig(source=args.corpus), args.context_size
    tf = token_file(corpus, model.tokenizer, context_size=S, n_tokens=args.total_tokens, split="train")
    n_seqs = args.total_tokens // S
    if tf.n_seqs < n_seqs:
        raise SystemExit(f"corpus {args.corpus!r} has {tf.n_tokens} train tokens, fewer than --tokens {args.total_tokens}")
    train_NS = tf.rows(list(range(n_seqs)))
    eval_NS = tokenize_sequences(corpus, model.tokenizer, context_size=S, n_tokens=args.eval_tokens, split="eval").tokens_NS
    train_path, eval_path = work / "train.safetensors", work / "eval.safetensors"
    save_file({"input_ids": train_NS.contiguous()}, str(train_path))
    save_file({"input_ids": eval_NS.contiguous()}, str(eval_path))
    return train_path, eval_path, eval_NS


def forward_rate(model, hook: str, train_path: Path, tokens: int, forward_seqs: int) -> float:
    """Tokens/s of the model to the hook alone over the first `tokens` training tokens."""
    from safetensors.torch import load_file

    ids_NS = load_file(str(train_path))["input_ids"]
    ids_NS = ids_NS[: max(1, -(-tokens // ids_NS.shape[1]))]
    t0 = time.perf_counter()
    acts_to_hook(model, hook, ids_NS, forward_seqs)
    return ids_NS.numel() / (time.perf_counter() - t0)


@torch.no_grad()
def measure_ours(sae_dir: Path, x_ND: torch.Tensor, chunk: int = 8192) -> dict:
    """EV, L0 and never-firing fraction of our saved SAE on raw activations (it reads raw
    activations: load_sae folds the training scale into its weights)."""
    from sae_transfer.sae.io import load_sae

    sae = load_sae(sae_dir)
    outs, fired_F, active = [], torch.zeros(sae.d_sae, dtype=torch.bool), 0
    for i in range(0, x_ND.shape[0], chunk):
        feats_BF = sae.encode(x_ND[i : i + chunk])
        outs.append(sae.decode(feats_BF))
        fired_F |= (feats_BF != 0).any(0)
        active += int((feats_BF != 0).sum())
    ev = float(metrics.explained_variance(x_ND, torch.cat(outs)))
    return {"explained_variance": ev, "l0": active / x_ND.shape[0], "dead_fraction": 1.0 - float(fired_F.float().mean()),
            "n_latents": sae.d_sae}


def train_ours(args, model, work: Path, x_ND: torch.Tensor) -> dict:
    """train_live with our TopK defaults; wall time of the call, run.json's tokens/s, metrics."""
    from sae_transfer.training.api import train_live
    from sae_transfer.training.config import TrainConfig

    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)  # a finished run would be skipped, not timed
    cfg = TrainConfig(arch="topk", k=args.k, batch_size=args.batch_size, total_tokens=args.total_tokens, seed=args.seed,
                      num_threads=args.threads, device="cpu", **({"lr": args.lr} if args.lr else {}))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = train_live(model, args.hook, args.corpus, out, cfg, expansion=args.expansion, context_size=args.context_size)
    seconds = time.perf_counter() - t0
    timings = json.loads(result.run_json.read_text())["timings"]
    return {"trainer": "ours", "tokens": args.total_tokens, "train_s": seconds, "tokens_per_s": args.total_tokens / seconds,
            "run_json_tokens_per_s": timings["tokens_per_s"], "load_before": load, "load_after": os.getloadavg()[0],
            **measure_ours(result.sae_dir, x_ND)}


def train_sparsify(args, model_dir: Path, train_path: Path, eval_path: Path, work: Path, x_ND: torch.Tensor) -> dict:
    """The driver under --sparsify-python; its JSON, plus how far its held-out activations are from ours."""
    from safetensors.torch import load_file

    out, acts = work / "sparsify.json", work / "sparsify-eval-acts.safetensors"
    cmd = [
        args.sparsify_python, str(DRIVER), "--model", str(model_dir), "--train", str(train_path), "--eval", str(eval_path),
        "--out", str(out), "--eval-acts", str(acts), "--hookpoint", args.sparsify_hookpoint,
        "--model-class", args.sparsify_model_class, "--k", str(args.k), "--expansion", str(args.expansion),
        "--batch-seqs", str(args.batch_size // args.context_size), "--seed", str(args.seed), "--threads", str(args.threads),
        "--forward-tokens", str(args.forward_tokens), "--work", str(work / "sparsify"),
    ]
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"sparsify driver failed ({done.returncode}):\n{done.stderr[-3000:]}")
    info = json.loads(out.read_text())
    theirs_ND = load_file(str(acts))["acts"]
    if theirs_ND.shape != x_ND.shape:
        raise SystemExit(f"held-out activations differ in shape: ours {tuple(x_ND.shape)}, sparsify {tuple(theirs_ND.shape)}")
    info["acts_max_rel_diff"] = float((theirs_ND - x_ND).abs().max() / x_ND.abs().max())
    return {**info, "load_before": load, "load_after": os.getloadavg()[0]}


def report(ours: dict, theirs: dict | None, fwd: float) -> dict | None:
    """Print the side-by-side table; returns the ratios (None without a sparsify run)."""
    print(f"\n{'':18}{'tokens':>10}{'train s':>9}{'tok/s':>9}{'EV':>8}{'L0':>7}{'dead':>8}  load (1 min) before/after")
    for name, r in (("ours (live)", ours), ("sparsify (live)", theirs)):
        if r is not None:
            print(f"{name:18}{r['tokens']:>10,}{r['train_s']:>9.1f}{r['tokens_per_s']:>9,.0f}{r['explained_variance']:>8.4f}"
                  f"{r['l0']:>7.1f}{r['dead_fraction']:>8.1%}  {r['load_before']:.1f} / {r['load_after']:.1f}")
    print(f"\nours: run.json tokens/s {ours['run_json_tokens_per_s']:,.0f}; forward to the hook alone {fwd:,.0f} tok/s")
    if theirs is None:
        return None
    if theirs.get("forward_tokens_per_s"):
        print(f"sparsify: forward alone ({theirs['settings']['model_class']}, whole model as fit() runs it) "
              f"{theirs['forward_tokens_per_s']:,.0f} tok/s; LR {theirs['lr']:.3g}; held-out activations vs ours: "
              f"max |diff| / max |x| = {theirs['acts_max_rel_diff']:.1e}")
    ratios = {"speed": ours["tokens_per_s"] / theirs["tokens_per_s"],
              "delta_ev": ours["explained_variance"] - theirs["explained_variance"],
              "delta_dead": ours["dead_fraction"] - theirs["dead_fraction"]}
    met = (ratios["speed"] >= GOAL_SPEED, ratios["delta_ev"] >= 0, ratios["delta_dead"] < 0)
    print(f"ours / sparsify tokens/s {ratios['speed']:.2f}x (goal >= {GOAL_SPEED}x: {'met' if met[0] else 'NOT met'}); "
          f"EV {ratios['delta_ev']:+.4f} ({'met' if met[1] else 'NOT met'}); "
          f"dead {ratios['delta_dead']:+.1%} ({'met' if met[2] else 'NOT met'})")
    return {**ratios, "goal_met": all(met)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF model folder (default: the demo base model)")
    p.add_argument("--wait-s", type=float, default=0, help="wait this long for a demo build in progress")
    p.add_argument("--hook", default=DEMO_HOOK, help="our hook (TransformerLens name)")
    p.add_argument("--sparsify-hookpoint", default="layers.1", help="the same activations in sparsify's naming")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--tokens", type=parse_count, default=1_200_000, help="training tokens per SAE (1.2M, 100k, ...)")
    p.add_argument("--eval-tokens", type=parse_count, default=65_536, help="held-out tokens (eval split)")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step, both sides (a multiple of the context)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="our learning rate (default: TrainConfig's, the study's 4e-4; "
                   "sparsify picks its own from the width)")
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--forward-tokens", type=parse_count, default=131_072, help="tokens of the forward-only timings")
    p.add_argument("--sparsify-python", default=None, help="python of an environment with eai-sparsify installed")
    p.add_argument("--sparsify-model-class", choices=("causal-lm", "base"), default="causal-lm",
                   help="causal-lm: AutoModelForCausalLM (LM head runs too); base: AutoModel, as sparsify's CLI loads it")
    p.add_argument("--work", type=Path, default=None, help="keep exported tokens and SAEs here (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write both sides' figures here")
    args = p.parse_args()
    if args.batch_size % args.context_size:
        p.error(f"--batch-size {args.batch_size} must be a multiple of --context-size {args.context_size} "
                "(sparsify batches whole sequences)")
    args.total_tokens = args.tokens // args.batch_size * args.batch_size  # whole steps on both sides
    torch.set_num_threads(args.threads)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-sparsify-")
    work = (args.work or Path(tmp.name)).resolve()
    work.mkdir(parents=True, exist_ok=True)

    from sae_transfer.models import load_model

    model_dir = model_folder(args)
    model = load_model(str(model_dir), device="cpu")
    train_path, eval_path, eval_NS = export_tokens(args, model, work)
    forward_seqs = max(1, FORWARD_TOKENS // args.context_size)
    x_ND = acts_to_hook(model, args.hook, eval_NS, forward_seqs)
    print(f"{model_dir} {args.hook}: {args.total_tokens:,} training tokens ({args.total_tokens // args.batch_size} steps of "
          f"{args.batch_size}), {x_ND.shape[0]:,} held-out tokens, {args.threads} thread(s), load {os.getloadavg()}",
          flush=True)
    fwd = forward_rate(model, args.hook, train_path, args.forward_tokens, forward_seqs)
    ours = train_ours(args, model, work, x_ND)
    print(f"  ours done: {ours['tokens_per_s']:,.0f} tok/s, EV {ours['explained_variance']:.4f}", flush=True)
    theirs = train_sparsify(args, model_dir, train_path, eval_path, work, x_ND) if args.sparsify_python else None
    ratios = report(ours, theirs, fwd)
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                         "forward_to_hook_tokens_per_s": fwd, "ours": ours, "sparsify": theirs,
                                         "ratios": ratios}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
