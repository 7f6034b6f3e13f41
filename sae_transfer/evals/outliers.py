"""Outlier-norm tokens: threshold rules on scaled norms and the seed study's breakdown
(BOS / within the first 10 positions / newline tokens / other)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class OutlierRule:
    """How the absolute threshold on scaled norms is chosen."""

    threshold: float | None = None  # absolute threshold (the seed study used 50 for Qwen1.5-0.5B, 200 for Mistral-7B); None: robust default
    mad_k: float = 10.0  # robust default: median + mad_k * 1.4826 * MAD of the scaled norms (far tail only)
    k_median: float = 3.0  # second rule, flagged separately: scaled norm > k_median * median


def choose_threshold(scaled_norms_N: torch.Tensor, rule: OutlierRule) -> tuple[str, float]:
    """(rule name, absolute threshold on scaled norms) for this model's norm distribution."""
    if rule.threshold is not None:
        return "absolute", float(rule.threshold)
    norms = scaled_norms_N.double()
    median = norms.median()
    mad = (norms - median).abs().median()
    return f"median+{rule.mad_k:g}mad", float(median + rule.mad_k * MAD_TO_SIGMA * mad)


@dataclass(frozen=True)
class Breakdown:
    """Shares of the outliers in each category (priority in this order; they sum to 1)."""

    n_tokens: int
    n_outliers: int
    frac_outliers: float  # n_outliers / n_tokens
    frac_bos: float
    frac_first10: float  # not BOS, position < 10
    frac_newline: float  # not above, token text contains a newline
    frac_other: float


def breakdown(
    is_outlier_N: torch.Tensor, is_bos_N: torch.Tensor, pos_N: torch.Tensor, is_newline_N: torch.Tensor
) -> Breakdown:
    """Fraction of outliers and their category shares (nan shares when there are none)."""
    out = is_outlier_N.bool()
    bos = out & is_bos_N.bool()
    first10 = out & ~bos & (pos_N < 10)
    newline = out & ~bos & ~first10 & is_newline_N.bool()
    other = out & ~bos & ~first10 & ~newline
    n, k = out.numel(), int(out.sum())

    def share(mask: torch.Tensor) -> float:
        return int(mask.sum()) / k if k else float("nan")

    return Breakdown(n, k, k / n if n else float("nan"), share(bos), share(first10), share(newline), share(other))


def newline_mask(token_ids_N: torch.Tensor, tokenizer) -> torch.Tensor:
    """True where the token's text contains a newline (decoded once per distinct id)."""
    unique = torch.unique(token_ids_N)
    has_nl = {int(t): "\n" in tokenizer.decode([int(t)]) for t in unique}
    lookup = torch.zeros(int(unique.max()) + 1 if unique.numel() else 1, dtype=torch.bool)
    for t, flag in has_nl.items():
        lookup[t] = flag
    return lookup[token_ids_N.cpu()]
