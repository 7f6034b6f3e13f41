"""Every model family the study used, through the project's real code, against plain `transformers`.

For each family a tiny random model is built from its config (2 layers, d_model 32, one shared
BPE tokenizer) and checked end to end: loading through TransformerBridge, hook names, cached
activations against `output_hidden_states`, patched-pass logits (resumed and hooked) against a
plain forward with the residual replaced by a forward pre-hook, a CE evaluation against the
plain forward's loss, and the lossless SAE (W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x)
= x exactly), which must give ce_sae == ce_clean, EV 1 and KL 0, and the study's greedy rollouts,
which must equal a plain `transformers` greedy decode token for token. Family quirks are switched on:
sliding windows shorter than the sequence (mistral, qwen2, gemma2), Gemma's embedding
normaliser, Gemma-2's post-norms, attention and final-logit soft-capping, GPT-2's absolute
positions.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae_transfer.activations import CacheConfig, cache_activations
from sae_transfer.corpus import ROLE_CODE, CorpusConfig
from sae_transfer.errors import UserError
from sae_transfer.evals import splice
from sae_transfer.evals.loading import LoadedSAE
from sae_transfer.evals.run import transfer_records
from sae_transfer.evals.transfer import EvalConfig, TokenSet
from sae_transfer.models import check_hooks, hook_names, load_model
from sae_transfer.sae import SAEConfig, make_sae
from sae_transfer.storage.activations import ActivationDataset
from tests._tiny import _training_text, build_tokenizer, tiny_corpus_dir

D, LAYER, SEQ = 32, 1, 24
HOOK = f"blocks.{LAYER}.hook_resid_pre"
WINDOW = 4  # sliding windows shorter than SEQ, so a wrong mask changes the logits

# family -> (config class, model class, config kwargs beyond the shared ones, path to the block list)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}, "model.layers"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}, "model.layers"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1,
               "layer_types": ["full_attention", "sliding_attention"]}, "model.layers"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}, "model.layers"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 8, "sliding_window": WINDOW, "final_logit_softcapping": 3.0,
                "attn_logit_softcapping": 5.0, "layer_types": ["full_attention", "sliding_attention"]},
               "model.layers"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None, "transformer.h"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return CorpusConfig(source=str(tiny_corpus_dir(tmp_path_factory.mktemp("corpus"), n_copies=1)))


def _config(name: str, tok):
    import transformers

    cfg_cls, _, extra, _ = FAMILIES[name]
    # initializer_range 10x the default: logits far from uniform, so a wrong pass moves the loss
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               initializer_range=0.2)
    if extra is None:  # GPT-2 spells its sizes differently
        return getattr(transformers, cfg_cls)(vocab_size=len(tok), n_embd=D, n_layer=2, n_head=4, n_positions=64, **ids)
    return getattr(transformers, cfg_cls)(
        vocab_size=len(tok), hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **ids, **extra)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tokenizer, tmp_path_factory):
    """A saved tiny model of one family, booted through the project's loader and as plain HF."""
    import transformers

    name = request.param
    torch.manual_seed(0)
    model = getattr(transformers, FAMILIES[name][1])(_config(name, tokenizer))
    folder = tmp_path_factory.mktemp(name) / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    assert type(plain).__name__ == FAMILIES[name][1]
    return SimpleNamespace(name=name, folder=folder, bridge=load_model(str(folder), device="cpu"), plain=plain.eval())


@pytest.fixture(scope="module")
def toks(tokenizer):
    """4 sequences of SEQ tokens of stdlib text, BOS first."""
    ids = tokenizer("".join(_training_text()))["input_ids"][: 4 * (SEQ - 1)]
    body = torch.tensor(ids).reshape(4, SEQ - 1)
    tokens_NS = torch.cat([torch.full((4, 1), tokenizer.bos_token_id), body], dim=1)
    roles_NS = torch.full(tokens_NS.shape, ROLE_CODE["text"], dtype=torch.uint8)
    roles_NS[:, 0] = ROLE_CODE["bos"]
    return TokenSet.plain(tokens_NS, roles_NS, "families")


def _plain_forward(fam, tokens_NS, replace=None, labels=False):
    """Plain HF forward; `replace(h_BSD)` (if given) sets the input of block LAYER."""
    layers = fam.plain
    for attr in FAMILIES[fam.name][3].split("."):
        layers = getattr(layers, attr)

    def pre_hook(module, args, kwargs):
        if args:
            return (replace(args[0]),) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

    handle = layers[LAYER].register_forward_pre_hook(pre_hook, with_kwargs=True) if replace else None
    try:
        with torch.no_grad():
            return fam.plain(tokens_NS, labels=tokens_NS if labels else None, output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()


def _lossless_sae() -> LoadedSAE:
    sae = make_sae(SAEConfig("standard", D, 2 * D))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return LoadedSAE(sae, {"sae_id": "lossless", "sae_model": None, "sae_finetuned_from": None}, None, "lossless")


def _random_sae() -> LoadedSAE:
    sae = make_sae(SAEConfig("standard", D, 4 * D))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return LoadedSAE(sae, {"sae_id": "random", "sae_model": None, "sae_finetuned_from": None}, None, "random")


def _by_hand(sae, x_BSD: torch.Tensor, r: float) -> torch.Tensor:
    """A standard SAE as applied at scale ratio r, written out: relu((r x - b_dec) W_enc + b_enc) W_dec / r + b_dec / r."""
    feats = torch.relu((r * x_BSD - sae.b_dec) @ sae.W_enc + sae.b_enc)
    return (feats @ sae.W_dec + sae.b_dec) / r


def test_hooks_and_cached_activations_equal_hidden_states(family, corpus, tmp_path):
    hooks = ("blocks.0.hook_resid_pre", HOOK)
    assert set(hooks) <= set(hook_names(family.bridge))
    check_hooks(family.bridge, list(hooks))
    cfg = CacheConfig(model=str(family.folder), hooks=hooks, corpus=corpus, n_tokens=4 * SEQ,
                      context_size=SEQ, batch_tokens=2 * SEQ)
    for layer, record in enumerate(cache_activations(cfg, tmp_path / "cache", progress=False)):
        ds = ActivationDataset(record.path)
        table = ds.read_table()
        ids_NS = torch.from_numpy(table.column("token_id").to_numpy().astype(np.int64)).reshape(-1, SEQ)
        want = _plain_forward(family, ids_NS).hidden_states[layer].reshape(-1, D)
        got = ds.acts(table).float()
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=0), (family.name, layer)


def test_patched_passes_equal_a_plain_forward_with_the_residual_replaced(family, toks):
    tokens = toks.tokens_NS
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        x = splice.hook_activations(family.bridge, tokens, HOOK)
        torch.testing.assert_close(x, _plain_forward(family, tokens).hidden_states[LAYER])
        x_hat = x + torch.randn(x.shape, generator=gen) * x.std()
        mask = torch.rand(tokens.shape, generator=gen) < 0.5
        assert splice.resume_from_layer(family.bridge, x, LAYER, tokens) is not None  # the shortcut is taken
        resumed = splice.spliced_logits(family.bridge, tokens, HOOK, x_hat, mask, clean_x_BSD=x)
        hooked = splice.spliced_logits(family.bridge, tokens, HOOK, x_hat, mask)
        plain = _plain_forward(family, tokens, lambda h: torch.where(mask[..., None], x_hat, h)).logits
        torch.testing.assert_close(resumed, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)
        zero_plain = _plain_forward(family, tokens, torch.zeros_like).logits
        torch.testing.assert_close(splice.zero_logits(family.bridge, tokens, HOOK, x), zero_plain, rtol=1e-5, atol=1e-5)
        # the clean pass after the resumed ones is untouched (the skipped blocks are back)
        _, clean = splice.clean_pass(family.bridge, tokens, HOOK)
        torch.testing.assert_close(clean, _plain_forward(family, tokens).logits, rtol=1e-5, atol=1e-5)


def test_ce_eval_matches_the_plain_forward_and_the_lossless_sae_is_exact(family, toks):
    saes = [_lossless_sae(), _random_sae()]
    cfg = EvalConfig(batch_tokens=2 * SEQ, n_bootstrap=20, keep_token_errors=False, policies=("included",))
    out = transfer_records(family.bridge, {"model_id": family.name, "model_revision": "test"}, saes, toks, HOOK, cfg)
    rows = {r["sae_id"]: r for r in out.metrics if r["outlier_policy"] == "included"}
    tokens = toks.tokens_NS
    ce_plain = float(_plain_forward(family, tokens, labels=True).loss)
    ce_zero_plain = float(_plain_forward(family, tokens, torch.zeros_like, labels=True).loss)
    lossless, rand = rows["lossless"], rows["random"]
    for row in (lossless, rand):
        assert row["ce_clean"] == pytest.approx(ce_plain, abs=1e-5)
        assert row["ce_zero"] == pytest.approx(ce_zero_plain, abs=1e-5)
    assert lossless["ce_sae"] == pytest.approx(lossless["ce_clean"], abs=1e-5)
    assert lossless["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert lossless["kl_sae"] == pytest.approx(0.0, abs=1e-5) and lossless["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    r = float(rand.get("scale_ratio") or 1.0)
    ce_sae_plain = float(_plain_forward(family, tokens, lambda h: _by_hand(saes[1].sae, h, r), labels=True).loss)
    assert abs(ce_sae_plain - ce_plain) > 1e-3  # the random SAE really changes the loss
    assert rand["ce_sae"] == pytest.approx(ce_sae_plain, abs=1e-5)


def test_rollouts_equal_a_plain_greedy_decode(family, tmp_path):
    # generated without the bridge, kept as ids: token for token what plain transformers decodes
    import shutil

    from transformers import AutoTokenizer

    from tests.test_evals_rollouts import CHAT_TEMPLATE, assert_rollouts_are_plain_greedy

    folder = tmp_path / family.name
    shutil.copytree(family.folder, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    assert_rollouts_are_plain_greedy(folder, tmp_path / "results", max_new_tokens=12)


def test_a_family_the_study_cannot_use_fails_in_one_line(tokenizer, tmp_path):
    """An architecture TransformerLens has no adapter for, and an encoder-only masked LM."""
    import transformers

    small = dict(vocab_size=len(tokenizer), hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * D)
    for name, model in {
        "biogpt": transformers.BioGptForCausalLM(transformers.BioGptConfig(**small)),
        "bert": transformers.BertForMaskedLM(transformers.BertConfig(**small)),
    }.items():
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        with pytest.raises(UserError, match=name) as info:
            load_model(str(tmp_path / name), device="cpu")
        assert "\n" not in str(info.value) and len(str(info.value)) < 400, str(info.value)
