"""Model loading through TransformerBridge, hook checks, provenance, and the CLI's errors."""

from __future__ import annotations

import pytest
import torch

from sae_transfer.demo import DemoPairConfig
from sae_transfer.demo.build import save_checkpoint
from sae_transfer.demo.pretrain import build_model
from sae_transfer.demo.tokenizer import train_tokenizer
from sae_transfer.errors import UserError
from sae_transfer.models import (
    check_hooks,
    hook_names,
    layer_of,
    load_model,
    model_identity,
    weights_fingerprint,
)
from tests._tiny import run_cli

TEXTS = ["def add(a, b):\n    return a + b\n", "class A:\n    pass\n", "import os\nprint(os.sep)\n"] * 20


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer Llama-style model + BPE tokenizer, saved as a HF folder."""
    cfg = DemoPairConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_mlp=64, context_size=32, chat_context_size=32)
    tokenizer = train_tokenizer(TEXTS, cfg.vocab_size)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_checkpoint(build_model(cfg, tokenizer), tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def bridge(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def test_load_model_serves_resid_hooks_matching_hf(bridge):
    names = hook_names(bridge)
    assert names == sorted(names)
    assert {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"} <= set(names)
    check_hooks(bridge, ["blocks.1.hook_resid_pre"])  # no error
    ids = bridge.to_tokens("def add(a, b):")
    _, cache = bridge.run_with_cache(ids, names_filter=["blocks.1.hook_resid_pre"])
    hidden = bridge.original_model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], hidden, atol=1e-5, rtol=1e-5)


def test_hook_typo_names_the_close_valid_hook(bridge):
    with pytest.raises(UserError) as info:
        check_hooks(bridge, ["blocks.0.hook_resid_pree"])
    message = str(info.value)
    assert "blocks.0.hook_resid_pre" in message and "\n" not in message


def test_missing_or_incomplete_model_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist") as info:
        load_model(str(tmp_path / "no-such-model"))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="does not exist"):
        load_model("artifacts-that-do-not-exist/demo-models/base")  # two slashes: never a Hub id
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="unknown dtype"):
        load_model(str(tmp_path / "empty"), dtype="float8")


def test_layer_of_and_identity(tiny_model_dir, tmp_path):
    assert layer_of("blocks.6.hook_resid_pre") == 6 and layer_of("hook_embed") is None
    ident = model_identity(str(tiny_model_dir))
    assert ident["model_revision"] == "sha256:" + weights_fingerprint(tiny_model_dir)
    assert model_identity("org/model", "abc") == {"model_id": "org/model", "model_revision": "abc"}
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in tiny_model_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    assert weights_fingerprint(copy) == weights_fingerprint(tiny_model_dir)
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert weights_fingerprint(copy) != weights_fingerprint(tiny_model_dir)


def test_cli_bad_model_path_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "hooks", "--model", str(tmp_path / "missing"))
    assert code == 2
    assert err.startswith("error: model folder") and err.count("\n") == 1


def test_cli_hooks_lists_and_checks(monkeypatch, capsys, tiny_model_dir, bridge):
    code, out, _ = run_cli(monkeypatch, capsys, "hooks", "--model", str(tiny_model_dir), "--contains", "resid_pre")
    assert code == 0 and out.split() == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    code, _, err = run_cli(monkeypatch, capsys, "hooks", "--model", str(tiny_model_dir), "--check", "blocks.0.hook_resid_pree")
    assert code == 2 and "blocks.0.hook_resid_pre," in err and err.count("\n") == 1


def _booted(tokenizer, bos_token_id):
    """What TransformerLens leaves for a tokenizer without a BOS token: its eos as the BOS."""
    from types import SimpleNamespace

    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    return SimpleNamespace(tokenizer=tokenizer, original_model=SimpleNamespace(config=SimpleNamespace(bos_token_id=bos_token_id)))


def test_qwen_chat_gets_the_configs_bos_not_its_turn_end():
    """Qwen1.5 has no BOS token; its chat tokenizer's eos is <|im_end|>. Base and chat must both
    start sequences with the configs' bos_token_id (<|endoftext|>), or every paired sequence differs
    at position 0."""
    from sae_transfer.models import align_bos
    from tests._qwen_shape import ENDOFTEXT, IM_END, SPECIAL_IDS, build_qwen_shape_tokenizer

    bos = SPECIAL_IDS[ENDOFTEXT]
    chat = _booted(build_qwen_shape_tokenizer(chat=True), bos)
    base = _booted(build_qwen_shape_tokenizer(chat=False), bos)
    assert chat.tokenizer.bos_token == IM_END  # what the bridge alone would prepend
    for bridge in (chat, base):
        align_bos(bridge)
        assert bridge.tokenizer.bos_token_id == bos
    assert chat.tokenizer.eos_token == IM_END  # generation still stops at the end of a turn


def test_a_tokenizer_with_its_own_bos_is_left_alone(tmp_path):
    from sae_transfer.models import align_bos

    tok = train_tokenizer(TEXTS, vocab_size=300)
    own = tok.bos_token_id
    assert own is not None and own != tok.eos_token_id
    bridge = _booted(tok, bos_token_id=own + 1)
    align_bos(bridge)
    assert bridge.tokenizer.bos_token_id == own
