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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_transfer.diffing.crosscoder import ARCHITECTURE, MODELS, CrossCoder
from sae_transfer.errors import UserError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "crosscoder_weights.safetensors"


def save_crosscoder(cc: CrossCoder, folder: str | Path, metadata: dict | None = None) -> Path:
    """Write `cc` to `folder` atomically (temp folder, then rename); returns the folder."""
    folder = Path(folder)
    D, F = cc.d_model, cc.d_sae
    tensors = {
        "W_enc": cc.W_enc.detach().view(2, D, F),
        "b_enc": cc.b_enc.detach(),
        "W_dec": cc.decoders_MFD().detach(),
        "b_dec": cc.b_dec.detach().view(2, D),
        "threshold": cc.threshold.detach(),
        "scales": cc.scales_M.detach(),
    }
    cfg = {
        "architecture": ARCHITECTURE,
        "d_model": D,
        "d_sae": F,
        "k": cc.cfg.k,
        "models": list(MODELS),
        "scale_factors": {m: float(s) for m, s in zip(MODELS, cc.scales_M.tolist())},
        "threshold": float(cc.threshold),
        "units": "training: raw activation of model m times scale_factors[m]",
        "dtype": "float32",
        "metadata": {**cc.cfg.metadata, **(metadata or {})},
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    save_file({k: v.float().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS_FILE)
    (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_crosscoder(folder: str | Path) -> CrossCoder:
    """Load a folder written by `save_crosscoder`; UserError for a missing file, key or bad shape."""
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder} is not a crosscoder folder: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{folder / CFG_FILE} is not valid JSON ({exc}); re-save the crosscoder") from exc
    if cfg.get("architecture") != ARCHITECTURE:
        raise UserError(f"{folder / CFG_FILE}: architecture {cfg.get('architecture')!r} is not {ARCHITECTURE!r}")
    D, F = int(cfg["d_model"]), int(cfg["d_sae"])
    tensors = load_file(str(folder / WEIGHTS_FILE))
    expected = {"W_enc": (2, D, F), "b_enc": (F,), "W_dec": (2, F, D), "b_dec": (2, D), "threshold": (), "scales": (2,)}
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise UserError(f"{folder / WEIGHTS_FILE}: {name} is {got}, cfg.json (d_model={D}, d_sae={F}) needs {shape}")
    cc = CrossCoder.create(D, F, int(cfg["k"]), metadata=cfg.get("metadata") or {})
    with torch.no_grad():
        cc.W_enc.copy_(tensors["W_enc"].reshape(2 * D, F))
        cc.b_enc.copy_(tensors["b_enc"])
        cc.W_dec.copy_(tensors["W_dec"].transpose(0, 1).reshape(F, 2 * D))
        cc.b_dec.copy_(tensors["b_dec"].reshape(2 * D))
        cc.threshold.copy_(tensors["threshold"])
        cc.scales_M.copy_(tensors["scales"])
    return cc
