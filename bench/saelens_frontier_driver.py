"""Train one SAE with SAELens's own `SAETrainer` and write its reconstruction of held-out rows.

Run by `bench_frontier.py --saelens-python PYTHON` with an interpreter whose environment has
`sae-lens` installed (a separate environment: SAELens pins transformer-lens < 4, which the
project cannot share). It imports only torch, safetensors and sae_lens, never the project.

Input: safetensors files holding `acts` [N, D], already scaled to mean norm √D by the bench, so
SAELens runs with normalize_activations="none" and both trainers see the same numbers.
Output (--out, safetensors): `x_hat` [E, D] for the eval rows and `l0` [E] (active latents per
row), plus a JSON file beside it with the settings and the training time.

    python bench/saelens_frontier_driver.py --train train.safetensors --eval eval.safetensors \
        --arch relu --l1 5 --tokens 1200000 --out relu-5.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def shuffled_batches(acts_ND: torch.Tensor, batch_size: int, seed: int):
    """Batches of a fresh permutation per epoch (the project's in-memory source does the same)."""
    n, epoch = acts_ND.shape[0], 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(n // batch_size):
            yield acts_ND.index_select(0, order[i * batch_size : (i + 1) * batch_size])
        epoch += 1


def build_sae(args, d_in: int, steps: int):
    """A fresh SAELens training SAE at the bench's setting (SAELens defaults otherwise)."""
    import sae_lens

    common = dict(d_in=d_in, d_sae=args.expansion * d_in, normalize_activations="none", device=args.device, dtype="float32")
    if args.arch == "relu":
        cfg = sae_lens.StandardTrainingSAEConfig(
            l1_coefficient=args.l1, l1_warm_up_steps=round(args.l1_warmup_frac * steps), **common)
        return sae_lens.StandardTrainingSAE(cfg)
    cfg = sae_lens.TopKTrainingSAEConfig(k=args.k, **common)
    return sae_lens.TopKTrainingSAE(cfg)


@torch.no_grad()
def reconstruct(sae, x_ND: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂ [N, D], active latents per row [N]) through SAELens's encode/decode."""
    sae.eval()
    outs, l0s = [], []
    for i in range(0, x_ND.shape[0], chunk):
        feats = sae.encode(x_ND[i : i + chunk].to(sae.device))
        feats = feats.to_dense() if feats.is_sparse else feats
        outs.append(sae.decode(feats).cpu())
        l0s.append((feats != 0).sum(-1).float().cpu())
    return torch.cat(outs), torch.cat(l0s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", choices=("relu", "topk"), required=True)
    p.add_argument("--l1", type=float, default=5.0)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--tokens", type=int, default=1_200_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--l1-warmup-frac", type=float, default=0.05)
    p.add_argument("--lr-decay-frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_ND, eval_ND = load_file(args.train)["acts"], load_file(args.eval)["acts"]
    steps = args.tokens // args.batch_size
    sae = build_sae(args, train_ND.shape[1], steps)
    # lr_end as SAELens's runner sets it (lr / 10); its constant schedule decays from lr anyway
    tcfg = SAETrainerConfig(
        total_training_samples=args.tokens, train_batch_size_samples=args.batch_size, lr=args.lr, lr_end=args.lr / 10,
        lr_decay_steps=round(args.lr_decay_frac * steps), device=args.device,
    )
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=shuffled_batches(train_ND, args.batch_size, args.seed))
    t0 = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - t0
    x_hat_ND, l0_N = reconstruct(sae, eval_ND)
    out = Path(args.out)
    save_file({"x_hat": x_hat_ND.contiguous(), "l0": l0_N.contiguous()}, str(out))
    info = {**vars(args), "sae_lens_version": sae_lens.__version__, "torch": torch.__version__,
            "train_s": train_s, "tokens_per_s": args.tokens / train_s}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
