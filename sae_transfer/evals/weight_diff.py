"""Relative weight differences between two checkpoints, read straight from safetensors:
||W_chat - W_base||_F / ||W_base||_F per layer and parameter (the seed study's explanation of
why Gemma v1 2B SAEs do not transfer)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sae_transfer.errors import UserError

_LAYER = re.compile(r"\.layers\.(\d+)\.|\.h\.(\d+)\.|\.blocks\.(\d+)\.")


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Parameter name -> safetensors file, for single-file and sharded checkpoints."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors files: pass a Hugging Face checkpoint folder saved with safetensors")
    out = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as fh:
                out.update({name: file for name in fh.keys()})
        except SafetensorError as exc:
            raise UserError(f"{file} is damaged ({str(exc).splitlines()[0]}): re-download or re-save the checkpoint") from None
    return out


def _load(path: Path, name: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as fh:
        return fh.get_tensor(name).float()


def param_kind(name: str) -> tuple[int | None, str]:
    """(layer index or None, short kind such as q_proj, down_proj, input_layernorm, embed, unembed)."""
    m = _LAYER.search(name)
    layer = next((int(g) for g in m.groups() if g is not None), None) if m else None
    parts = name.removesuffix(".weight").removesuffix(".bias").split(".")
    if "embed_tokens" in name or name.endswith("wte.weight"):
        return layer, "embed"
    if name.startswith("lm_head"):
        return layer, "unembed"
    kind = parts[-1] + ("_bias" if name.endswith(".bias") else "")
    return layer, ("final_norm" if layer is None and "norm" in kind else kind)


def weight_diff_rows(base_dir: str | Path, chat_dir: str | Path) -> list[dict]:
    """One row per parameter present in both checkpoints: norms of W_base and W_chat - W_base.

    Parameters present in only one checkpoint (e.g. a tied lm_head) are skipped; a shape
    mismatch raises UserError (the checkpoints are not a base/fine-tune pair).
    """
    base_files, chat_files = _tensor_files(Path(base_dir)), _tensor_files(Path(chat_dir))
    rows = []
    for name in sorted(set(base_files) & set(chat_files)):
        w_base, w_chat = _load(base_files[name], name), _load(chat_files[name], name)
        if w_base.shape != w_chat.shape:
            raise UserError(f"parameter {name} has shape {tuple(w_base.shape)} vs {tuple(w_chat.shape)}: "
                            "the checkpoints are not the same architecture")
        layer, kind = param_kind(name)
        base_norm = float(w_base.double().norm())
        diff_norm = float((w_chat.double() - w_base.double()).norm())
        rows.append({
            "base_model": str(base_dir), "chat_model": str(chat_dir), "param": name, "layer": layer, "kind": kind,
            "numel": w_base.numel(), "base_norm": base_norm, "diff_norm": diff_norm,
            "rel_diff": diff_norm / base_norm if base_norm else float("nan"),
        })
    if not rows:
        raise UserError(f"{base_dir} and {chat_dir} share no parameter names: pass two checkpoints of one architecture")
    return rows
