"""Train one TopK SAE live with EleutherAI's sparsify (`eai-sparsify`) and measure it on held-out tokens.

Run by `bench_sparsify.py --sparsify-python PYTHON` with an interpreter whose environment has
`eai-sparsify` installed (a separate environment: sparsify is no project dependency). It
imports only torch, safetensors, datasets, transformers and sparsify, never the project.

Input: the Hugging Face model folder and safetensors files holding `input_ids` [N, S] int64
(training and held-out sequences, exported by the bench with the project's tokenisation, BOS
included). sparsify trains through its own `Trainer.fit()`: the model runs over batches of
`--batch-seqs` sequences and a forward hook on `--hookpoint` (a module of `model.base_model`,
e.g. `layers.1`: that decoder layer's output, TransformerLens's `blocks.2.hook_resid_pre`)
trains the SAE on every token of the batch. Everything not set here is sparsify's default:
signum (sign SGD) under a schedule-free wrapper, LR 5e-3 / sqrt(latents / 2^14), FVU loss,
no AuxK, no input normalisation, b_dec set to the first batch's mean.

Output (--out, JSON): tokens trained, fit() wall seconds, tokens/s, explained variance
(1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2 over every held-out token), L0, the fraction of
latents that never fire on the held-out tokens, and a forward-only timing of the model as fit()
runs it. `--eval-acts PATH` also writes the held-out activations (`acts` [E, D]) so the bench can
check that both sides read the same numbers.

    python bench/sparsify_live_driver.py --model artifacts/demo-models/base --train train.safetensors \
        --eval eval.safetensors --batch-seqs 32 --threads 1 --out sparsify.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load_model(path: str, model_class: str):
    """The HF model in float32 on the CPU, frozen; `base` is what sparsify's CLI loads for the FVU
    loss (AutoModel: no LM head), `causal-lm` the model with its head (AutoModelForCausalLM)."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if model_class == "causal-lm" else AutoModel
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def train_dataset(ids_NS: torch.Tensor, seed: int):
    """A `datasets.Dataset` of `input_ids` in a seeded random order, as sparsify's CLI shuffles
    (its Trainer does not: 'the dataset should be shuffled before passing it')."""
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": ids_NS.tolist()}).shuffle(seed=seed).flatten_indices()
    return ds.with_format("torch", columns=["input_ids"])


def fit(args, model, dataset) -> tuple[float, float, Path]:
    """sparsify's Trainer.fit() on `dataset`; returns (wall seconds, its LR, the saved SAE folder)."""
    from sparsify import SaeConfig, TrainConfig, Trainer

    cfg = TrainConfig(
        SaeConfig(k=args.k, expansion_factor=args.expansion), batch_size=args.batch_seqs, hookpoints=[args.hookpoint],
        init_seeds=[args.seed], log_to_wandb=False, save_dir=str(args.work),
    )
    trainer = Trainer(cfg, dataset, model)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    # fit() saves the schedule-free average (the weights to use) under save_dir/<run name>/<hookpoint>
    return seconds, lr, args.work / (cfg.run_name or "unnamed") / args.hookpoint


@torch.no_grad()
def hook_acts(model, hookpoint: str, ids_NS: torch.Tensor, batch_seqs: int) -> torch.Tensor:
    """[N * S, D] float32 outputs of `model.base_model.<hookpoint>` (the first tensor of a tuple)."""
    module, got = model.base_model.get_submodule(hookpoint), []

    def capture(_module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        got.append(out.detach().float().flatten(0, 1).clone())

    handle = module.register_forward_hook(capture)
    try:
        for i in range(0, ids_NS.shape[0], batch_seqs):
            model(ids_NS[i : i + batch_seqs])
    finally:
        handle.remove()
    return torch.cat(got)


@torch.no_grad()
def measure(sae, x_ND: torch.Tensor, chunk: int = 8192) -> dict:
    """EV, L0 and never-firing fraction of a sparsify SAE over rows x_ND (its encode/decode)."""
    fired_F = torch.zeros(sae.num_latents, dtype=torch.bool)
    sq_err, active = 0.0, 0
    for i in range(0, x_ND.shape[0], chunk):
        x_BD = x_ND[i : i + chunk]
        top_acts_BK, top_idx_BK, _ = sae.encode(x_BD)
        x_hat_BD = sae.decode(top_acts_BK, top_idx_BK)
        sq_err += float((x_BD.double() - x_hat_BD.double()).pow(2).sum())
        live_BK = top_acts_BK > 0  # top-k of ReLU pre-activations: a selected zero is no firing
        fired_F[top_idx_BK[live_BK]] = True
        active += int(live_BK.sum())
    x64_ND = x_ND.double()
    total_var = float((x64_ND - x64_ND.mean(0)).pow(2).sum())
    return {"explained_variance": 1.0 - sq_err / total_var, "l0": active / x_ND.shape[0],
            "dead_fraction": 1.0 - float(fired_F.float().mean()), "n_latents": sae.num_latents}


@torch.no_grad()
def forward_rate(model, ids_NS: torch.Tensor, batch_seqs: int, tokens: int) -> float:
    """Tokens/s of the plain model forward as fit() runs it (whole model, batches of batch_seqs)."""
    n = max(1, min(ids_NS.shape[0], math.ceil(tokens / ids_NS.shape[1])))
    t0 = time.perf_counter()
    for i in range(0, n, batch_seqs):
        model(ids_NS[i : min(i + batch_seqs, n)])
    return n * ids_NS.shape[1] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--train", required=True, help="safetensors with input_ids [N, S] to train on")
    p.add_argument("--eval", required=True, help="safetensors with held-out input_ids [E, S]")
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--eval-acts", default=None, help="also write the held-out activations here (safetensors)")
    p.add_argument("--hookpoint", default="layers.1", help="module of model.base_model whose output trains the SAE")
    p.add_argument("--model-class", choices=("causal-lm", "base"), default="causal-lm")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--batch-seqs", type=int, default=32, help="sequences per step (sparsify's batch_size)")
    p.add_argument("--seed", type=int, default=0, help="SAE init seed and dataset shuffle seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--forward-tokens", type=int, default=131_072, help="tokens of the forward-only timing (0: skip)")
    p.add_argument("--work", type=Path, default=None, help="sparsify's save_dir (default: a temp folder)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="sparsify-live-")
    args.work = args.work or Path(tmp.name)
    model = load_model(args.model, args.model_class)
    train_NS, eval_NS = load_file(args.train)["input_ids"], load_file(args.eval)["input_ids"]
    dataset = train_dataset(train_NS, args.seed)
    seconds, lr, sae_dir = fit(args, model, dataset)
    tokens = len(dataset) * train_NS.shape[1]

    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(sae_dir)
    x_ND = hook_acts(model, args.hookpoint, eval_NS, args.batch_seqs)
    if args.eval_acts:
        save_file({"acts": x_ND.contiguous()}, args.eval_acts)
    metrics = measure(sae, x_ND)
    fwd = forward_rate(model, train_NS, args.batch_seqs, args.forward_tokens) if args.forward_tokens else None
    info = {
        "trainer": "sparsify", "sparsify_version": version("eai-sparsify"), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "tokens": tokens, "train_s": seconds, "tokens_per_s": tokens / seconds,
        "eval_tokens": x_ND.shape[0], **metrics, "lr": lr, "optimizer": "signum + schedule-free (sparsify default)",
        "forward_tokens_per_s": fwd, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    Path(args.out).write_text(json.dumps(info, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
