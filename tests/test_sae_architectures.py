"""SAE architectures, scale folding and the shared metrics, on hand-set weights."""

import torch

from sae_transfer.sae import SAEConfig, make_sae, metrics
from sae_transfer.sae.scaling import fold_scale


def _random_sae(arch, d=8, f=32, k=None, seed=0):
    sae = make_sae(SAEConfig(arch, d, f, k=k))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        if hasattr(sae, "threshold") and sae.threshold.ndim == 1:
            sae.threshold.copy_(torch.rand(f, generator=gen) * 0.5)
    return sae


def test_relu_alias_and_forward_shapes():
    sae = _random_sae("relu")
    assert sae.cfg.architecture == "standard"
    x = torch.randn(5, 8)
    feats = sae.encode(x)
    assert feats.shape == (5, 32) and (feats >= 0).all()
    assert torch.allclose(sae(x), feats @ sae.W_dec + sae.b_dec)


def test_topk_keeps_k_and_sparse_decoder_matches_dense():
    sae = _random_sae("topk", k=4)
    x = torch.randn(6, 8) + 3
    feats = sae.encode(x)
    assert ((feats != 0).sum(-1) <= 4).all() and ((feats != 0).sum(-1) >= 1).all()
    vals, idx = sae.encode_sparse(x)
    assert torch.allclose(sae.decode_sparse(vals, idx), sae.decode(feats), atol=1e-5)
    assert torch.allclose(sae(x), sae.decode(feats), atol=1e-5)


def test_batchtopk_keeps_batch_times_k_and_converts_to_jumprelu():
    sae = _random_sae("batchtopk", k=3)
    x = torch.randn(10, 8) + 2
    feats = sae.encode(x)
    assert int((feats > 0).sum()) == 30
    assert (feats > 0).sum(-1).float().std() > 0  # per-token counts vary: the selection is batch-wide
    sae.threshold.fill_(0.4)
    jr = sae.to_jumprelu()
    assert jr.cfg.architecture == "jumprelu" and torch.all(jr.threshold == 0.4)
    pre = sae.pre_acts(x)
    assert torch.equal(jr.encode(x), pre * (pre > 0.4))


def test_jumprelu_threshold_gates_features():
    sae = _random_sae("jumprelu")
    with torch.no_grad():
        sae.threshold.fill_(1.0)
    pre = sae.pre_acts(torch.randn(7, 8))
    feats = sae.encode(torch.randn(7, 8))
    assert ((feats == 0) | (feats > 1.0)).all()
    assert torch.equal(sae.activation(pre), torch.where(pre > 1.0, pre, torch.zeros_like(pre)))


def test_fold_scale_gives_same_features_on_raw_activations():
    for arch, k in (("relu", None), ("topk", 4), ("jumprelu", None)):
        sae = _random_sae(arch, k=k)
        raw = torch.randn(9, 8) * 7
        s = 0.3
        folded = fold_scale(sae, s)
        assert torch.allclose(folded.encode(raw), sae.encode(raw * s), atol=1e-5)
        assert torch.allclose(folded(raw) * s, sae(raw * s), atol=1e-5)
        back = fold_scale(folded, 1 / s)
        assert torch.allclose(back.W_enc, sae.W_enc, atol=1e-6)


def test_metrics_on_known_values():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    feats = torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    assert metrics.l0(feats).item() == 1.0
    assert metrics.mse(x, x_hat).item() == 0.5  # (1 + 0) / 2 tokens
    # E‖x‖² = 5, ‖E x‖² = 4 -> variance 1; EV = 1 - 0.5 / 1
    assert abs(metrics.explained_variance(x, x_hat).item() - 0.5) < 1e-6
    # per token: ‖x - mean‖² = 1 each; errors 1 and 0 -> mean(0, 1) = 0.5
    assert abs(metrics.explained_variance_legacy(x, x_hat).item() - 0.5) < 1e-6
    assert metrics.explained_variance(x, x).item() == 1.0


def test_batchtopk_on_sequences_keeps_k_per_token_on_average():
    """[B, S, D] input: the batch holds B·S tokens, so B·S·k values survive (mean L0 = k), and the
    selection equals the one on the same tokens flattened to [B·S, D]."""
    sae = _random_sae("batchtopk", d=8, f=64, k=4)
    x_BSD = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1)) + 1
    feats_BSF = sae.encode(x_BSD)
    assert int((feats_BSF > 0).sum()) == 2 * 16 * 4
    assert float((feats_BSF > 0).sum(-1).float().mean()) == 4.0
    torch.testing.assert_close(feats_BSF.reshape(32, 64), sae.encode(x_BSD.reshape(32, 8)))
    # by hand: the 128 largest ReLU pre-activations of the whole batch
    pre = torch.relu(sae.pre_acts(x_BSD.reshape(32, 8))).flatten()
    cut = pre.sort(descending=True).values[127]
    assert torch.equal(feats_BSF.flatten() > 0, pre >= cut)
