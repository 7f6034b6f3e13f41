"""SAELens 6 folder layout: round trips, fixture folders in SAELens's own layout, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_transfer.errors import UserError
from sae_transfer.sae import SAEConfig, make_sae
from sae_transfer.sae.io import load_sae, save_sae
from sae_transfer.storage.sae_format import load_log10_density

D, F = 16, 64


def _sae(arch, k=None, seed=0):
    sae = make_sae(SAEConfig(arch, D, F, k=k, metadata={"hook_name": "blocks.1.hook_resid_pre"}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            if name == "threshold":
                p.abs_()
    return sae


@pytest.mark.parametrize("arch,k", [("relu", None), ("topk", 4), ("jumprelu", None)])
def test_round_trip_with_folded_scale(tmp_path, arch, k):
    sae = _sae(arch, k)
    density = torch.linspace(-5, 0, F)
    folder = save_sae(sae, tmp_path / "sae", scale_factor=0.25, metadata={"model_name": "m", "context_size": 32},
                      log10_density_F=density)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_in"] == D and cfg["d_sae"] == F and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["activation_scale_factor"] == 0.25 and cfg["metadata"]["sae_lens_version"].startswith("6")
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre" and cfg["metadata"]["model_name"] == "m"
    keys = load_file(str(folder / "sae_weights.safetensors"))
    assert keys["W_enc"].shape == (D, F) and keys["W_dec"].shape == (F, D)
    loaded = load_sae(folder, expect_d_in=D, expect_hook="blocks.1.hook_resid_pre")
    raw = torch.randn(10, D) * 4
    assert torch.allclose(loaded.encode(raw), sae.encode(raw * 0.25), atol=1e-5)
    assert torch.allclose(loaded(raw) * 0.25, sae(raw * 0.25), atol=1e-5)
    assert torch.equal(load_log10_density(folder), density)


def test_batchtopk_is_saved_as_jumprelu_with_threshold(tmp_path):
    sae = _sae("batchtopk", k=4)
    sae.threshold.fill_(0.3)
    loaded = load_sae(save_sae(sae, tmp_path / "b"))
    assert loaded.cfg.architecture == "jumprelu"
    assert torch.allclose(loaded.threshold, torch.full((F,), 0.3))


def _saelens_folder(path, architecture, tensors, extra_cfg=None):
    """A folder exactly as SAELens 6's save_inference_model writes it."""
    path.mkdir()
    cfg = {
        "architecture": architecture, "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1", "model_name": "gpt2",
            "hook_name": "blocks.6.hook_resid_pre", "hook_head_index": None, "model_class_name": "HookedTransformer",
            "model_from_pretrained_kwargs": {"center_writing_weights": False}, "prepend_bos": True,
            "context_size": 128, "dataset_path": "monology/pile-uncopyrighted", "seqpos_slice": [None],
            "exclude_special_tokens": False, "sequence_separator_token": "bos", "disable_concat_sequences": False,
        },
        **(extra_cfg or {}),
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return path


def _tensors(with_threshold=False):
    gen = torch.Generator().manual_seed(3)
    t = {"W_enc": torch.randn(D, F, generator=gen), "b_enc": torch.randn(F, generator=gen),
         "W_dec": torch.randn(F, D, generator=gen), "b_dec": torch.randn(D, generator=gen)}
    if with_threshold:
        t["threshold"] = torch.rand(F, generator=gen)
    return t


def test_loads_saelens_standard_topk_jumprelu_folders(tmp_path):
    x = torch.randn(5, D)
    t = _tensors()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    sae = load_sae(_saelens_folder(tmp_path / "std", "standard", t), expect_d_in=D, expect_hook="blocks.6.hook_resid_pre")
    assert torch.allclose(sae(x), torch.relu(pre) @ t["W_dec"] + t["b_dec"], atol=1e-4)

    sae = load_sae(_saelens_folder(tmp_path / "topk", "topk", t, {"k": 5, "rescale_acts_by_decoder_norm": False}))
    feats = sae.encode(x)
    assert ((feats != 0).sum(-1) <= 5).all()
    vals, idx = pre.topk(5, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    assert torch.allclose(feats, expected, atol=1e-5)

    tj = _tensors(with_threshold=True)
    sae = load_sae(_saelens_folder(tmp_path / "jr", "jumprelu", tj))
    pre = (x - tj["b_dec"]) @ tj["W_enc"] + tj["b_enc"]
    assert torch.allclose(sae.encode(x), pre * (pre > tj["threshold"]), atol=1e-5)
    assert sae.cfg.metadata["context_size"] == 128


def test_clear_errors(tmp_path):
    t = _tensors()
    missing = dict(t)
    del missing["b_enc"]
    with pytest.raises(UserError, match="lacks tensor 'b_enc'"):
        load_sae(_saelens_folder(tmp_path / "a", "standard", missing))
    bad = dict(t, W_dec=torch.zeros(F, D + 1))
    with pytest.raises(UserError, match="W_dec has shape"):
        load_sae(_saelens_folder(tmp_path / "b", "standard", bad))
    good = _saelens_folder(tmp_path / "c", "standard", t)
    with pytest.raises(UserError, match="d_in=16.*d_model=32"):
        load_sae(good, expect_d_in=32)
    with pytest.raises(UserError, match="hook"):
        load_sae(good, expect_hook="blocks.2.hook_resid_pre")
    with pytest.raises(UserError, match="threshold"):
        load_sae(_saelens_folder(tmp_path / "d", "jumprelu", t))
    with pytest.raises(UserError, match="not an SAE folder"):
        load_sae(tmp_path / "nothing")


def test_expected_average_only_in_folds_the_recorded_scale(tmp_path):
    """SAELens's `expected_average_only_in` weights read x * s (s recorded): the loaded SAE on raw
    x must equal the hand-written SAE on s * x, and be a different map from the unfolded one."""
    t, s = _tensors(with_threshold=True), 0.125
    folder = _saelens_folder(tmp_path / "eao", "jumprelu", t, {"normalize_activations": "expected_average_only_in"})
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["activation_scale_factor"] = s
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(folder)
    x = torch.randn(6, D) * 8
    pre = (s * x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    feats = pre * (pre > t["threshold"])
    assert (feats > 0).any()
    torch.testing.assert_close(sae.encode(x), feats, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae(x), (feats @ t["W_dec"] + t["b_dec"]) / s, atol=1e-4, rtol=1e-4)
    assert sae.cfg.metadata["activation_scale_factor"] == s  # now s_train folded in, like our own SAEs


@pytest.mark.parametrize("extra,match", [
    ({"normalize_activations": "expected_average_only_in"}, "activation_scale_factor is None"),
    ({"normalize_activations": "constant_norm_rescale"}, "constant_norm_rescale.*each token"),
    ({"normalize_activations": "layer_norm"}, "layer_norm.*each token"),
    ({"normalize_activations": "whiten"}, "unknown"),
    ({"reshape_activations": "hook_z"}, "reshape_activations"),
    ({"k": 5, "rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm"),
])
def test_normalisations_that_cannot_be_honoured_are_refused_in_one_line(tmp_path, extra, match):
    arch = "topk" if "k" in extra else "standard"
    with pytest.raises(UserError, match=match) as info:
        load_sae(_saelens_folder(tmp_path / "f", arch, _tensors(), extra))
    assert "\n" not in str(info.value) and "cfg.json" in str(info.value)
