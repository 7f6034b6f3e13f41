"""Crosscoder folders: both decoders, both scale factors, safetensors + JSON (never pickle).

    <folder>/cfg.json                         architecture, d_model, d_sae, k, models, scale
                                              factors, threshold, units, metadata{...}
    <folder>/crosscoder_weights.safetensors   W_enc [2, D, F] (encoder block of each model),
                                              b_enc [F], W_dec [2, F, D] (decoder of each model),
                                              b_dec [2, D], threshold [], scales [2]

Index 0 is the base model, 1 the chat model. Weights are in training units: model m's raw
activations times scales[m] (see sae_transfer.diffing.crosscoder for why nothing is folded).
The [2, ...] layout is the one dictionary_learning's crosscoders use (encoder.weight
[2, D, F], decoder.weight [2, F, D]), so the tensors map one to one.

This module reads and writes the folder only (the cfg.json dict and the tensors, checked
against the shapes above); building the module from them is
`sae_transfer.diffing.crosscoder_io`'s job.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_transfer.errors import UserError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "crosscoder_weights.safetensors"


def tensor_shapes(d_model: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    """The tensors a folder holds and their shapes, for models of width d_model and d_sae latents."""
    D, F = d_model, d_sae
    return {"W_enc": (2, D, F), "b_enc": (F,), "W_dec": (2, F, D), "b_dec": (2, D), "threshold": (), "scales": (2,)}


def write_crosscoder_folder(folder: str | Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write cfg.json and the tensors (as float32 on the CPU) to `folder` atomically (temp
    folder, then rename); returns the folder. cfg needs d_model and d_sae; the tensors must
    have the `tensor_shapes` shapes."""
    folder = Path(folder)
    _check(folder / WEIGHTS_FILE, cfg, tensors)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS_FILE)
    (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def read_crosscoder_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json dict, tensors on the CPU) of a folder written by `write_crosscoder_folder`;
    UserError for a missing file, bad JSON, a missing tensor or a bad shape."""
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder} is not a crosscoder folder: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{folder / CFG_FILE} is not valid JSON ({exc}); re-save the crosscoder") from exc
    if not isinstance(cfg, dict) or "d_model" not in cfg or "d_sae" not in cfg:
        raise UserError(f"{folder / CFG_FILE} needs d_model and d_sae; re-save the crosscoder")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    _check(folder / WEIGHTS_FILE, cfg, tensors)
    return cfg, tensors


def _check(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    D, F = int(cfg["d_model"]), int(cfg["d_sae"])
    for name, shape in tensor_shapes(D, F).items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise UserError(f"{path}: {name} is {got}, cfg.json (d_model={D}, d_sae={F}) needs {shape}")
