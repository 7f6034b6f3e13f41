"""Cross-model scaling (DESIGN.md "Scaling"), checked on a function-preserving rescaled copy.

Multiplying a Llama's embedding and every o_proj / down_proj by c makes the whole residual
stream c times larger while RMSNorm keeps the logits the same (up to its epsilon). Each model's
scale factor then differs by exactly c, so with x_hat = SAE(r x) / r, r = s_eval / s_train,
every metric of an SAE is the same on the original and on the copy, and an SAE trained on the
copy matches one trained on the original. With r = 1 (the SAE applied to raw activations of
the other model) they differ wildly: that is the bug this file guards against.
"""

from __future__ import annotations

import math

import pytest
import torch

from sae_transfer.activations import CacheConfig, cache_activations
from sae_transfer.corpus import CorpusConfig
from sae_transfer.sae import SAEConfig, make_sae
from sae_transfer.sae.io import load_sae, save_sae
from sae_transfer.sae.scaling import cross_model_ratio, fold_scale, rescaled, scale_factor_of, training_scale
from tests._tiny import tiny_corpus_dir, tiny_model_dir

HOOK = "blocks.1.hook_resid_pre"
C = 3.0
METRICS = ("l0", "mse", "explained_variance", "explained_variance_legacy", "ce_clean", "ce_sae", "ce_zero",
           "ce_loss_score", "kl_sae", "kl_zero", "kl_div_score", "n_tokens")


def rescaled_copy(src, dst, c: float):
    """Save a copy of the Llama at `src` with embedding, o_proj and down_proj multiplied by c.

    RMSNorm's epsilon is set to 1e-12 so that the copy is function-preserving to float precision
    (with the default 1e-6 and a tiny random model's small activations it is not quite)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(src)
    model.config.rms_norm_eps = 1e-12
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(c)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(c)
            layer.mlp.down_proj.weight.mul_(c)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    random = tiny_model_dir(root, d_model=32, n_layers=2)
    orig = rescaled_copy(random, root / "orig", 1.0)
    copy = rescaled_copy(random, root / "copy", C)
    corpus = CorpusConfig(source=str(tiny_corpus_dir(root, n_copies=4)))
    saes = {}
    for name, model in (("orig", orig), ("copy", copy)):
        cfg = CacheConfig(model=str(model), hooks=(HOOK,), corpus=corpus, n_tokens=6144, context_size=64, device="cpu")
        acts = cache_activations(cfg, root / "acts" / name, progress=False)[0].path
        from sae_transfer.training.api import train_on_dataset
        from sae_transfer.training.config import TrainConfig

        cfg = TrainConfig(arch="relu", total_tokens=6144, batch_size=512, l1_coefficient=2.0, seed=0, num_threads=1,
                          device="cpu")
        run = train_on_dataset(acts, root / "saes" / name, cfg, expansion=4)
        saes[name] = str(run.sae_dir)
    return {"orig": str(orig), "copy": str(copy), "corpus": corpus, "saes": saes}


def _rows(pair, model: str) -> dict:
    from sae_transfer.evals.api import evaluate_transfer
    from sae_transfer.study import parse_study

    settings = parse_study({"corpus": {"source": pair["corpus"].source}, "eval": {"tokens": 768, "bootstrap": 20},
                            "outliers": {"threshold": 25.0}, "device": "cpu"}).eval_settings
    rows = evaluate_transfer([pair["saes"]["orig"], pair["saes"]["copy"]], pair[model], HOOK, settings)
    return {(r["sae_id"].split(":")[0], r["outlier_policy"]): r for r in rows["metrics"]}


@pytest.fixture(scope="module")
def rows(pair):
    return {m: _rows(pair, m) for m in ("orig", "copy")}


def test_copy_is_function_preserving_and_c_times_larger(pair):
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(pair["orig"])(tokens, output_hidden_states=True)
        b = AutoModelForCausalLM.from_pretrained(pair["copy"])(tokens, output_hidden_states=True)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert torch.allclose(b.hidden_states[1], C * a.hidden_states[1], rtol=1e-5, atol=1e-5)


def test_scale_factors_differ_by_c_and_r_is_recorded(pair, rows):
    s_orig = training_scale(load_sae(pair["saes"]["orig"]))
    s_copy = training_scale(load_sae(pair["saes"]["copy"]))
    assert s_orig / s_copy == pytest.approx(C, rel=1e-4)
    on_copy = rows["copy"][("orig", "included")]
    assert on_copy["scale_factor_train"] == pytest.approx(s_orig)
    assert on_copy["scale_ratio"] == pytest.approx(on_copy["scale_factor_eval"] / s_orig)
    assert on_copy["scale_ratio"] == pytest.approx(rows["orig"][("orig", "included")]["scale_ratio"] / C, rel=1e-4)


@pytest.mark.parametrize("sae", ["orig", "copy"])
@pytest.mark.parametrize("policy", ["included", "excluded"])
def test_every_metric_is_the_same_on_the_rescaled_copy(rows, sae, policy):
    a, b = rows["orig"][(sae, policy)], rows["copy"][(sae, policy)]
    for name in METRICS:
        assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-4), name


def test_the_copys_own_sae_matches_the_originals(rows):
    for policy in ("included", "excluded"):
        a, b = rows["orig"][("orig", policy)], rows["copy"][("copy", policy)]
        for name in METRICS:
            assert b[name] == pytest.approx(a[name], rel=1e-3, abs=1e-3), name


def test_rescaled_sae_is_sae_of_r_x_over_r():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig("standard", 8, 16))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(5, 8)
    r = 1.7
    assert torch.allclose(rescaled(sae, r)(x), sae(r * x) / r, atol=1e-5)
    assert rescaled(sae, 1.0) is sae
    assert cross_model_ratio(2.0, None) == 1.0 and cross_model_ratio(2.0, 4.0) == 0.5


def test_rescaled_lossless_sae_rounds_once():
    # The lossless SAE (relu(x) - relu(-x) = x) applied at a ratio r reconstructs x exactly when r
    # is a power of two and within one float32 rounding otherwise: what the CLI tests' tolerance
    # on its CE (a saved SAE records s_train = 1, so r = s_eval there) allows, and no more.
    from sae_transfer.evals.transfer import apply_sae
    from tests.test_evals_metrics import lossless_sae

    x = torch.randn(4, 50, 32, generator=torch.Generator().manual_seed(0)) * 0.12
    for r, exact in ((1.0, True), (2.0, True), (0.25, True), (47.3165231249403, False), (0.839, False)):
        x_hat, _ = apply_sae(rescaled(lossless_sae(32), r), x)
        rel = ((x_hat - x).abs() / x.abs()).max().item()
        assert (rel == 0.0) if exact else (0.0 < rel <= torch.finfo(torch.float32).eps), (r, rel)


def test_scale_factor_of_gives_mean_norm_sqrt_d():
    x = torch.randn(1000, 64) * 7
    s = scale_factor_of(x.norm(dim=-1), 64)
    assert float((s * x).norm(dim=-1).mean()) == pytest.approx(math.sqrt(64), rel=1e-5)
    with pytest.raises(ValueError, match="mean activation norm"):
        scale_factor_of(torch.zeros(3), 4)


def test_finetune_starts_from_the_parents_normalised_weights(tmp_path):
    # A parent trained at s_parent = 2 and saved with it folded in; the child reads s_child-scaled
    # activations of another model. Its starting weights must equal the parent's normalised ones.
    from sae_transfer.training.config import TrainConfig
    from sae_transfer.training.run import fresh_run

    torch.manual_seed(0)
    norm_sae = make_sae(SAEConfig("standard", 8, 16))
    with torch.no_grad():
        for p in norm_sae.parameters():
            p.copy_(torch.randn_like(p))
    save_sae(norm_sae, tmp_path / "parent", scale_factor=2.0)
    parent = load_sae(tmp_path / "parent")
    other_raw = torch.randn(4096, 8) * 10.0  # the chat model: s_child = sqrt(8)/E||x|| ~ 0.1, not 2

    def source(start):
        yield other_raw

    run = fresh_run(TrainConfig(arch="relu", d_sae=16, total_tokens=4096, batch_size=4096, device="cpu"), source, 8, parent)
    assert run.state.scale_factor == pytest.approx(scale_factor_of(other_raw.norm(dim=-1), 8), rel=1e-5)
    for name, p in norm_sae.state_dict().items():
        assert torch.allclose(run.sae.state_dict()[name], p, atol=1e-5), name
    assert torch.allclose(fold_scale(run.sae, 1.0)(torch.ones(1, 8)), norm_sae(torch.ones(1, 8)), atol=1e-5)
