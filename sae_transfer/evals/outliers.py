"""Outlier-norm tokens: threshold rules on scaled norms and the seed study's breakdown
(BOS / within the first 10 positions / newline tokens / other)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_transfer.study import OutlierSection

_OUTLIERS = OutlierSection()  # the study config's defaults are the evaluator's

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


RULES = ("absolute", "k_median", "either")  # which tokens are excluded (DESIGN.md "Outliers")


@dataclass(frozen=True)
class OutlierRule:
    """Which tokens count as outliers (and are excluded under the "excluded" policy)."""

    rule: str = "absolute"  # "absolute" (the seed study's), "k_median", or "either" of the two
    # absolute threshold on scaled norms, one per model pair (the study: Qwen1.5 50, Gemma 300, Mistral 200);
    # None: the robust estimate below
    threshold: float | None = None
    # robust estimate: median + mad_k * 1.4826 * MAD of the scaled norms (far tail only); printed and recorded
    # as a suggestion
    mad_k: float = _OUTLIERS.mad_k
    k_median: float = _OUTLIERS.k_median  # k x median rule: scaled norm > k_median * median of the evaluated model's scaled norms
    threshold_source: str = "config"  # where `threshold` came from, recorded on rows (e.g. "pair estimate on <base model>")

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"outliers.rule: {self.rule!r} is not a rule; use one of {', '.join(RULES)}")
        if self.threshold is not None and not self.threshold >= 0:
            raise ValueError(f"outliers.threshold: {self.threshold} must be >= 0 "
                             "(a scaled norm; the mean scaled norm is sqrt(d_model))")


def suggest_threshold(scaled_norms_N: torch.Tensor, mad_k: float) -> float:
    """median + mad_k * 1.4826 * MAD of scaled norms: a robust cut-off far in the upper tail."""
    norms = scaled_norms_N.double()
    median = norms.median()
    mad = (norms - median).abs().median()
    return float(median + mad_k * MAD_TO_SIGMA * mad)


def choose_threshold(scaled_norms_N: torch.Tensor, rule: OutlierRule) -> tuple[str, float]:
    """(where the absolute threshold came from, the threshold on scaled norms): the configured
    value, else the robust estimate on these norms (callers pass the pair's reference model)."""
    if rule.threshold is not None:
        return rule.threshold_source, float(rule.threshold)
    return f"median+{rule.mad_k:g}mad", suggest_threshold(scaled_norms_N, rule.mad_k)


@dataclass(frozen=True)
class Flags:
    """Per-token outlier flags of both rules and the configured combination."""

    absolute_N: torch.Tensor  # scaled norm > absolute threshold
    k_median_N: torch.Tensor  # scaled norm > k_median * median
    outlier_N: torch.Tensor  # what the configured rule excludes


def flag_tokens(scaled_N: torch.Tensor, abs_threshold: float, kmedian_threshold: float, rule: str) -> Flags:
    """Both rules' flags and the configured rule's outliers (same shape as `scaled_N`)."""
    a, k = scaled_N > abs_threshold, scaled_N > kmedian_threshold
    return Flags(a, k, {"absolute": a, "k_median": k, "either": a | k}[rule])


def flagged_by(absolute: bool, k_median: bool) -> str | None:
    """Which rule(s) flagged a token: "absolute", "k_median", "both" or None."""
    return "both" if absolute and k_median else "absolute" if absolute else "k_median" if k_median else None


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
