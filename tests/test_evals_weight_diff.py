"""Relative weight differences read from safetensors checkpoints."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from sae_transfer.errors import UserError
from sae_transfer.evals.weight_diff import param_kind, weight_diff_rows
from tests._tiny import tiny_model_dir


def test_only_the_changed_matrix_differs(tmp_path):
    base = tiny_model_dir(tmp_path, name="base")
    chat = tmp_path / "chat"
    shutil.copytree(base, chat)
    tensors = load_file(str(chat / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    w = tensors[name].clone()
    tensors[name] = w * 1.5  # ||W_chat - W_base|| / ||W_base|| = 0.5 exactly
    save_file(tensors, str(chat / "model.safetensors"), metadata={"format": "pt"})
    rows = {r["param"]: r for r in weight_diff_rows(base, chat)}
    assert rows[name]["rel_diff"] == pytest.approx(0.5)
    assert (rows[name]["layer"], rows[name]["kind"]) == (1, "q_proj")
    assert all(r["rel_diff"] == 0.0 for p, r in rows.items() if p != name)
    assert rows["model.embed_tokens.weight"]["kind"] == "embed" and rows["model.embed_tokens.weight"]["layer"] is None
    assert rows["lm_head.weight"]["kind"] == "unembed"


def test_param_kinds():
    assert param_kind("model.layers.3.mlp.down_proj.weight") == (3, "down_proj")
    assert param_kind("model.layers.0.input_layernorm.weight") == (0, "input_layernorm")
    assert param_kind("model.norm.weight") == (None, "final_norm")
    assert param_kind("model.layers.2.self_attn.k_proj.bias") == (2, "k_proj_bias")


def test_mismatched_architectures_are_refused(tmp_path):
    a = tiny_model_dir(tmp_path, name="a", d_model=32)
    b = tiny_model_dir(tmp_path, name="b", d_model=64)
    with pytest.raises(UserError, match="shape"):
        weight_diff_rows(a, b)
