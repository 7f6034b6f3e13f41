"""Causal check: ablating no latent changes nothing; ablating every latent of an identity SAE
equals clamping the residual at 0 in a plain hooked pass; the random set is a same-size draw
from the latents that fire."""

from __future__ import annotations

import pytest
import torch

from sae_transfer.corpus import ROLE_CODE
from sae_transfer.diffing.causal import ALL, CausalConfig, ablation_kl, firing_counts, random_latents
from sae_transfer.evals.transfer import TokenSet
from sae_transfer.models import load_model
from sae_transfer.sae.scaling import scale_factor
from tests._diffing import relu_sae
from tests._tiny import tiny_model_dir

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(tiny_model_dir(tmp_path_factory.mktemp("m"))), device="cpu")


@pytest.fixture(scope="module")
def toks(model):
    """Right-padded "transcripts": BOS, 5 template, 8 user, 1 template, assistant tokens, padding."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.cfg.d_vocab, (4, 30), generator=g)
    roles = torch.full_like(tokens, ROLE_CODE["assistant"], dtype=torch.uint8)
    roles[:, 0], roles[:, 1:6], roles[:, 6:14], roles[:, 14] = (ROLE_CODE["bos"], ROLE_CODE["template"], ROLE_CODE["user"],
                                                                ROLE_CODE["template"])
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, 24:], valid[3, 20:] = False, False
    tokens[:, 0] = model.tokenizer.bos_token_id
    return TokenSet(tokens, roles, valid, valid.clone(), "all", "test")


def _s_eval(model, toks):
    from sae_transfer.evals import splice

    with torch.inference_mode():
        x = splice.hook_activations(model, toks.tokens_NS, HOOK)
    return scale_factor(float(x[toks.valid_NS].norm(dim=-1).mean()), x.shape[-1])


def _identity_sae(d: int):
    """D latents, latent j = ReLU(x_j), decoder e_j: Σ_j f_j d_j = ReLU(x)."""
    return relu_sae(torch.eye(d))


def test_empty_set_gives_zero_kl_and_every_latent_clamps_the_residual(model, toks):
    from sae_transfer.evals import splice

    d = model.cfg.d_model
    s = _s_eval(model, toks)
    res = ablation_kl(model, _identity_sae(d), toks, HOOK, {"none": [], "all": list(range(d))}, s,
                      CausalConfig(batch_tokens=60))
    for seg, r in res["none"].segments.items():
        assert r.n_tokens > 0 and abs(r.kl_mean) < 1e-6 and r.ablated_norm_frac == 0.0, seg
    # independent answer: a plain hooked forward with the residual clamped at 0, KL from log-softmax
    with torch.inference_mode():
        clean = splice.next_token_logprobs(model(toks.tokens_NS, return_type="logits"))
        clamped = splice.next_token_logprobs(model.run_with_hooks(
            toks.tokens_NS, return_type="logits", fwd_hooks=[(HOOK, lambda act, hook=None: act.clamp(max=0))]))
        kl_NS = splice.kl_per_token(clean, clamped)
    user = (toks.roles_NS == ROLE_CODE["user"]) & toks.valid_NS
    assert res["all"].segments["user_prompt"].kl_mean == pytest.approx(float(kl_NS[user].mean()), rel=1e-4)
    assert res["all"].segments[ALL].kl_mean == pytest.approx(float(kl_NS[toks.valid_NS].mean()), rel=1e-4)
    assert res["all"].segments[ALL].n_tokens == int(toks.valid_NS.sum())
    assert res["all"].segments["rollout"].kl_mean > 0 and res["all"].segments["template"].kl_mean > 0


def test_random_set_is_a_seeded_draw_from_firing_latents(model, toks):
    d = model.cfg.d_model
    W = torch.eye(d)
    sae = relu_sae(W, b_enc_F=torch.zeros(d))
    with torch.no_grad():
        sae.b_enc[: d // 2] = -1e6  # the first half never fires
    s = _s_eval(model, toks)
    counts = firing_counts(model, sae, toks, HOOK, s, CausalConfig(batch_tokens=60))
    assert (counts[: d // 2] == 0).all() and (counts[d // 2:] > 0).all()
    chosen = [d - 1, d - 2]
    draw = random_latents(counts, 3, chosen, seed=7)
    assert draw == random_latents(counts, 3, chosen, seed=7) and len(draw) == 3
    assert all(d // 2 <= j < d - 2 for j in draw)
    res = ablation_kl(model, sae, toks, HOOK, {"given": chosen, "random": draw}, s, CausalConfig(batch_tokens=60))
    assert res["given"].segments[ALL].kl_mean > 0 and res["random"].segments[ALL].kl_mean > 0
    assert res["random"].latents == draw


def test_ablation_table_has_both_sets_on_every_segment(model, toks):
    from sae_transfer.diffing import api
    from tests._diffing import loaded

    sae = _identity_sae(model.cfg.d_model)
    table = api.ablation_table(model, "tiny", loaded(sae, "id:1"), toks, HOOK, [0, 1, 2], s_eval=_s_eval(model, toks)).to_pandas()
    assert len(table) == 2 * 4 and set(table.latent_set) == {"given", "random"}
    assert set(table.segment) == {"user_prompt", "rollout", "template", ALL}
    given = table[table.latent_set == "given"]
    assert all(list(x) == [0, 1, 2] for x in given.latents) and (table.set_size == 3).all()
    assert (table.kl_mean > 0).all() and (table.n_tokens > 0).all()
