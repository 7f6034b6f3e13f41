"""CE/KL splicing on a tiny bias-free Llama: exact answers for the lossless SAE, zero ablation
and position masks."""

from __future__ import annotations

import math

import pytest
import torch

from sae_transfer.evals import splice
from sae_transfer.evals.outliers import OutlierRule
from sae_transfer.evals.transfer import EvalConfig, TokenSet, evaluate_saes, norm_pass
from sae_transfer.models import load_model
from sae_transfer.sae import ReluSAE, SAEConfig
from tests._tiny import tiny_model_dir
from tests.test_evals_metrics import lossless_sae

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(tiny_model_dir(tmp_path_factory.mktemp("m"))), device="cpu")


@pytest.fixture(scope="module")
def toks(model):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.cfg.d_vocab, (6, 24), generator=g)
    tokens[:, 0] = model.tokenizer.bos_token_id
    roles = torch.ones_like(tokens, dtype=torch.uint8)
    roles[:, 0] = 0
    return TokenSet.plain(tokens, roles, "test")


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", HOOK])
def test_zeroed_residual_gives_uniform_logits(model, toks, hook):
    # Llama has no biases and RMSNorm(0) = 0: a zero residual stays zero through every block and
    # the final norm, so the logits are all 0 and the loss is exactly ln(vocab) at any layer.
    with torch.inference_mode():
        logits = splice.zero_logits(model, toks.tokens_NS, hook)
    assert float(logits.abs().max()) == 0.0
    loss = splice.next_token_loss(splice.next_token_logprobs(logits), toks.tokens_NS)[:, :-1]
    assert float(loss.mean()) == pytest.approx(math.log(model.cfg.d_vocab), abs=1e-5)


def test_lossless_sae_recovers_all_loss(model, toks):
    cfg = EvalConfig(batch_tokens=48, n_bootstrap=200)
    norms = norm_pass(model, toks, HOOK, cfg)
    res = evaluate_saes(model, {"lossless": lossless_sae(model.cfg.d_model)}, toks, HOOK, norms, cfg)["lossless"]
    with torch.inference_mode():
        x = splice.hook_activations(model, toks.tokens_NS, HOOK)
    for _policy, r in res.policies.items():
        assert r.ce_sae == r.ce_clean and r.kl_sae == pytest.approx(0.0, abs=1e-7)
        assert (r.ce_zero - r.ce_sae) / (r.ce_zero - r.ce_clean) == 1.0
        assert r.ce_ci == (1.0, 1.0)
        assert r.ce_zero == pytest.approx(math.log(model.cfg.d_vocab), abs=1e-5)
        assert r.recon.mse == 0.0 and r.recon.explained_variance == 1.0 and r.recon.explained_variance_legacy == 1.0
    assert res.policies["included"].recon.l0 == pytest.approx(float((x != 0).sum(-1).float().mean()))
    assert res.policies["included"].recon.n_tokens == toks.tokens_NS.numel()


def test_excluded_positions_keep_their_activation(model, toks):
    zero_sae = ReluSAE(SAEConfig("standard", model.cfg.d_model, 4))  # x_hat = 0 everywhere
    with torch.inference_mode():
        _, clean = splice.clean_pass(model, toks.tokens_NS, HOOK)
        x_hat = zero_sae(splice.hook_activations(model, toks.tokens_NS, HOOK))
        none = torch.zeros(toks.tokens_NS.shape, dtype=torch.bool)
        assert torch.equal(splice.spliced_logits(model, toks.tokens_NS, HOOK, x_hat, none), clean)
        last = none.clone()
        last[:, -1] = True
        patched = splice.spliced_logits(model, toks.tokens_NS, HOOK, x_hat, last)
    assert torch.allclose(patched[:, :-1], clean[:, :-1], atol=1e-6)  # causal: earlier positions untouched
    assert not torch.allclose(patched[:, -1], clean[:, -1])


def test_outlier_policy_changes_counted_tokens(model, toks):
    cfg = EvalConfig(batch_tokens=1000, outliers=OutlierRule(threshold=0.0), n_bootstrap=50)  # every token an outlier
    norms = norm_pass(model, toks, HOOK, cfg)
    assert bool(norms.outlier_NS.all()) and norms.rule == "absolute"
    assert norms.scale * float(norms.norms_NS.mean()) == pytest.approx(math.sqrt(model.cfg.d_model), rel=1e-5)
    sae = ReluSAE(SAEConfig("standard", model.cfg.d_model, 4))
    res = evaluate_saes(model, {"z": sae}, toks, HOOK, norms, cfg)["z"]
    assert res.policies["excluded"].recon.n_tokens == 0
    assert res.policies["included"].recon.n_tokens == toks.tokens_NS.numel()
    assert res.token_errors["is_outlier"].all() and len(res.token_errors["seq_id"]) == toks.tokens_NS.numel()


def test_resumed_patched_pass_matches_hooked_pass(model, toks):
    assert splice.resume_layer(HOOK) == 1 and splice.resume_layer("blocks.0.hook_resid_pre") is None
    assert splice.resume_layer("blocks.1.hook_resid_post") is None
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(toks.tokens_NS.shape, generator=g) > 0.5
    with torch.inference_mode():
        x = splice.hook_activations(model, toks.tokens_NS, HOOK)
        x_hat = x + torch.randn(x.shape, generator=g)
        hooked = splice.spliced_logits(model, toks.tokens_NS, HOOK, x_hat, mask)
        resumed = splice.spliced_logits(model, toks.tokens_NS, HOOK, x_hat, mask, clean_x_BSD=x)
        assert torch.allclose(hooked, resumed, atol=1e-5)
        assert torch.equal(splice.zero_logits(model, toks.tokens_NS, HOOK, x), splice.zero_logits(model, toks.tokens_NS, HOOK))



def test_logit_stats_equal_the_log_softmax_path():
    import torch

    from sae_transfer.evals import splice

    gen = torch.Generator().manual_seed(0)
    clean_BSV = torch.randn(2, 5, 11, generator=gen)
    patched_BSV = clean_BSV + 0.5 * torch.randn(2, 5, 11, generator=gen)
    tokens_BS = torch.randint(0, 11, (2, 5), generator=gen)
    logp_clean = splice.next_token_logprobs(clean_BSV)
    p_clean = logp_clean.exp()
    clean = splice.logit_stats(clean_BSV, tokens_BS, p_clean)
    patched = splice.logit_stats(patched_BSV, tokens_BS, p_clean)
    logp = splice.next_token_logprobs(patched_BSV)
    torch.testing.assert_close(patched.loss_BS, splice.next_token_loss(logp, tokens_BS))
    torch.testing.assert_close(patched.kl_from(clean), splice.kl_per_token(logp_clean, logp))
    assert torch.equal(clean.kl_from(clean), torch.zeros(2, 5))


def test_resumed_patched_pass_equals_the_hooked_pass(model, toks):
    """Patched passes at resid_pre run only the blocks from the hook on: same logits as a
    pass through every block with the hook replaced."""
    with torch.inference_mode():
        x = splice.hook_activations(model, toks.tokens_NS, HOOK)
        x_hat = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        mask = torch.rand(toks.tokens_NS.shape, generator=torch.Generator().manual_seed(2)) < 0.5
        assert splice.resume_from_layer(model, x, 1) is not None
        resumed = splice.spliced_logits(model, toks.tokens_NS, HOOK, x_hat, mask, clean_x_BSD=x)
        hooked = splice.spliced_logits(model, toks.tokens_NS, HOOK, x_hat, mask)
        torch.testing.assert_close(resumed, hooked, rtol=1e-5, atol=1e-5)
        zero_resumed = splice.zero_logits(model, toks.tokens_NS, HOOK, x)
        torch.testing.assert_close(zero_resumed, splice.zero_logits(model, toks.tokens_NS, HOOK), rtol=1e-5, atol=1e-5)


def test_k_median_rule_excludes_what_it_flags(model, toks):
    # k = 1: every token above the median scaled norm is an outlier, so the "excluded" policy
    # counts exactly the tokens at or below the median (the absolute threshold is not used).
    cfg = EvalConfig(batch_tokens=1000, n_bootstrap=20, outliers=OutlierRule(rule="k_median", threshold=1e9, k_median=1.0))
    norms = norm_pass(model, toks, HOOK, cfg)
    scaled = norms.norms_NS * norms.scale
    expected = int((scaled <= scaled.median()).sum())
    assert int(norms.flags.absolute_N.sum()) == 0 and int((~norms.outlier_NS).sum()) == expected
    res = evaluate_saes(model, {"lossless": lossless_sae(model.cfg.d_model)}, toks, HOOK, norms, cfg)["lossless"]
    assert res.policies["excluded"].recon.n_tokens == expected


def test_segment_zero_ablation_at_every_position_equals_full_zero_ablation(model, toks):
    cfg = EvalConfig(batch_tokens=1000, n_bootstrap=20, zero_segment=True, policies=("included",))
    norms = norm_pass(model, toks, HOOK, cfg)
    r = evaluate_saes(model, {"l": lossless_sae(model.cfg.d_model)}, toks, HOOK, norms, cfg)["l"].policies["included"]
    assert r.ce_zero_segment == pytest.approx(r.ce_zero, rel=1e-5)
    # on half the positions only, the zeroed positions hurt less than zeroing every position
    half = TokenSet(toks.tokens_NS, toks.roles_NS, toks.valid_NS,
                    torch.arange(toks.tokens_NS.shape[1]).expand_as(toks.tokens_NS) % 2 == 0)
    r = evaluate_saes(model, {"l": lossless_sae(model.cfg.d_model)}, half, HOOK, norms, cfg)["l"].policies["included"]
    # independent answer: a full hooked pass zeroing the counted positions, losses averaged there
    def zero_counted(act, hook=None):
        return torch.where(half.counted_NS[..., None], torch.zeros_like(act), act)

    with torch.inference_mode():
        logits = model.run_with_hooks(toks.tokens_NS, return_type="logits", fwd_hooks=[(HOOK, zero_counted)])
    loss = splice.next_token_loss(splice.next_token_logprobs(logits), toks.tokens_NS)
    counted = half.counted_NS.clone()
    counted[:, -1] = False  # the last position predicts nothing
    assert r.ce_zero_segment == pytest.approx(float(loss[counted].mean()), rel=1e-5)
    assert r.ce_zero_segment != pytest.approx(r.ce_zero, rel=1e-6)


def test_reliability_flags_ill_conditioned_rows():
    from sae_transfer.evals.records import reliability

    assert reliability(10_000, 2.0, (0.8, 0.9), 0.5) is None
    why = reliability(192, 0.02, (0.1, 2.9), 0.01)
    assert "192 tokens" in why and "ce_zero - ce_clean" in why and "interval" in why and "variance" in why
    assert reliability(10_000, float("nan"), (0.8, 0.9), 0.5) is not None
