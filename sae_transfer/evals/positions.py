"""Reconstruction by position bucket, including positions past the SAE's training context
(length generalisation; seed 002 shows positional features that may not extrapolate)."""

from __future__ import annotations

import torch

from sae_transfer.evals import splice
from sae_transfer.evals.metrics import ReconAccumulator
from sae_transfer.evals.transfer import apply_sae
from sae_transfer.study import EvalSection


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """Inclusive (lo, hi) buckets: 0, 1, 2-3, 4-7, ... up to seq_len - 1."""
    buckets, lo = [(0, 0)], 1
    while lo < seq_len:
        hi = min(2 * lo - 1, seq_len - 1)
        buckets.append((lo, hi))
        lo = 2 * lo
    return [b for b in buckets if b[0] < seq_len]


def context_sizes(sae_context: int, model_max: int | None, multiples: tuple[int, ...] = (1, 2, 4)) -> list[int]:
    """The evaluated sequence lengths: multiples of the SAE's context the model can take."""
    sizes = [m * sae_context for m in multiples]
    return [s for s in sizes if model_max is None or s <= model_max]


@torch.inference_mode()
def position_curves(
    model, saes: dict, tokens_NS: torch.Tensor, hook: str, *, scale: float, threshold: float,
    batch_tokens: int = EvalSection().batch_tokens, device: str | None = None,
) -> list[dict]:
    """Per (SAE, outlier policy, bucket): n_tokens, l0, mse (scaled units), explained_variance,
    mean scaled norm. Rows carry `sae_id`; the caller adds provenance and context sizes.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n, seq_len = tokens_NS.shape
    buckets = position_buckets(seq_len)
    bucket_of_S = torch.empty(seq_len, dtype=torch.long)
    for i, (lo, hi) in enumerate(buckets):
        bucket_of_S[lo : hi + 1] = i
    bucket_of_S = bucket_of_S.to(device)
    saes = {sid: sae.to(device) for sid, sae in saes.items()}
    accs: dict[tuple, ReconAccumulator] = {}
    # scaled-norm sums stay on the device (float64) until the end: no host sync per bucket
    norm_sums: dict[tuple, torch.Tensor] = {}
    step = max(1, batch_tokens // seq_len)
    for start in range(0, n, step):
        x_BSD = splice.hook_activations(model, tokens_NS[start : start + step].to(device), hook)
        scaled_BS = x_BSD.float().norm(dim=-1) * scale
        bucket_BS = bucket_of_S[None, :].expand(scaled_BS.shape)
        policies = (("excluded", scaled_BS <= threshold), ("included", torch.ones_like(scaled_BS, dtype=torch.bool)))
        for sid, sae in saes.items():
            x_hat_BSD, l0_BS = apply_sae(sae, x_BSD)
            for policy, keep_BS in policies:
                for b in range(len(buckets)):
                    m = keep_BS & (bucket_BS == b)
                    key = (sid, policy, b)
                    acc = accs.setdefault(key, ReconAccumulator(x_BSD.shape[-1]))
                    acc.add(x_BSD[m], x_hat_BSD[m], l0_BS[m])
                    norm_sums[key] = norm_sums.get(key, 0.0) + scaled_BS[m].double().sum()
    rows = []
    for (sid, policy, b), acc in accs.items():
        r = acc.result(scale)
        rows.append({
            "sae_id": sid, "outlier_policy": policy, "outlier_threshold": threshold,
            "context_size": seq_len, "bucket_lo": buckets[b][0], "bucket_hi": buckets[b][1], "n_tokens": r.n_tokens,
            "l0": r.l0, "mse": r.mse, "explained_variance": r.explained_variance,
            "mean_scaled_norm": float(norm_sums[(sid, policy, b)]) / r.n_tokens if r.n_tokens else float("nan"),
        })
    return rows
