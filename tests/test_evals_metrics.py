"""Exact answers for the reconstruction metrics and the bootstrap interval."""

from __future__ import annotations

from fractions import Fraction as Fr

import pytest
import torch

from sae_transfer.evals.bootstrap import ce_score_ci
from sae_transfer.evals.metrics import ReconAccumulator, reconstruction_metrics
from sae_transfer.sae import ReluSAE, SAEConfig
from sae_transfer.sae import metrics as sae_metrics
from sae_transfer.sae.scaling import scale_factor_of


def lossless_sae(d: int) -> ReluSAE:
    """d_sae = 2 d, W_enc = [I, -I], W_dec = [I; -I], zero biases: x_hat = relu(x) - relu(-x) = x."""
    sae = ReluSAE(SAEConfig("standard", d, 2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def hand_sae() -> ReluSAE:
    """W_enc = I, W_dec = diag(0.5, 1): halves the first coordinate of positive x, keeps the second."""
    sae = ReluSAE(SAEConfig("standard", 2, 2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.diag(torch.tensor([0.5, 1.0])))
    return sae


X = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 3.0], [0.0, 0.0]])


def test_lossless_sae_reconstructs_exactly():
    x = torch.randn(64, 16)
    x[:, 3] = 0.0  # a coordinate that is never active
    sae = lossless_sae(16)
    feats = sae.encode(x)
    m = reconstruction_metrics(x, sae(x), feats, scale=3.0)
    assert torch.equal(sae(x), x)
    assert m.mse == 0.0 and m.explained_variance == 1.0 and m.explained_variance_legacy == 1.0
    assert m.l0 == pytest.approx(float((x != 0).sum(-1).float().mean()))


def test_hand_set_weights_known_metrics():
    # errors per token: 1, 0, 4, 0; active features: 1, 1, 1, 0; mean x = (0, 5/4)
    sae = hand_sae()
    with torch.no_grad():
        x_hat, feats = sae(X), sae.encode(X)
    assert torch.equal(x_hat, torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 3.0], [0.0, 0.0]]))
    m = reconstruction_metrics(X, x_hat, feats, scale=2.0)
    assert m.l0 == pytest.approx(0.75)
    assert m.mse == pytest.approx(4 * 5 / 4)  # scale^2 * mean error
    assert m.explained_variance == pytest.approx(float(Fr(39, 59)))  # 1 - (5/4) / (21/4 - 25/16)
    legacy = (Fr(73, 89) + 1 + Fr(49, 113) + 1) / 4  # 1 - e_t / ||x_t - mean||^2, averaged
    assert m.explained_variance_legacy == pytest.approx(float(legacy))
    # the definitions shared with training agree on one batch
    assert m.explained_variance == pytest.approx(float(sae_metrics.explained_variance(X, x_hat)))
    assert m.explained_variance_legacy == pytest.approx(float(sae_metrics.explained_variance_legacy(X, x_hat)))


def test_accumulator_is_batching_invariant_for_exact_sums():
    torch.manual_seed(0)
    x = torch.randn(100, 8) + 2.0
    x_hat = x + 0.3 * torch.randn(100, 8)
    l0 = torch.randint(0, 5, (100,))
    whole = ReconAccumulator(8)
    whole.add(x, x_hat, l0)
    parts = ReconAccumulator(8)
    for i in range(0, 100, 7):
        parts.add(x[i : i + 7], x_hat[i : i + 7], l0[i : i + 7])
    a, b = whole.result(1.5), parts.result(1.5)
    assert (a.n_tokens, a.l0) == (b.n_tokens, b.l0)
    assert a.mse == pytest.approx(b.mse) and a.explained_variance == pytest.approx(b.explained_variance)


def test_scale_factor_gives_mean_norm_sqrt_d():
    x = torch.randn(500, 64) * 7.0
    s = scale_factor_of(x.norm(dim=-1), 64)
    assert float((s * x).norm(dim=-1).mean()) == pytest.approx(8.0)


def test_bootstrap_ci_brackets_point_estimate_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(40, generator=g) + 1.0
    zero = clean + 5.0
    sae = clean + 0.5 + 0.2 * torch.rand(40, generator=g)
    point = float((zero.sum() - sae.sum()) / (zero.sum() - clean.sum()))
    lo, hi = ce_score_ci(clean, sae, zero, n_resamples=500, seed=3)
    assert lo < point < hi and hi - lo < 0.05
    assert (lo, hi) == ce_score_ci(clean, sae, zero, n_resamples=500, seed=3)
    assert ce_score_ci(clean, clean, zero) == (1.0, 1.0)
