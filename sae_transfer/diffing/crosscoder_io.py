"""Save and load a `CrossCoder` as a crosscoder folder (layout: sae_transfer.storage.crosscoder_format).

The storage module reads and writes the folder (cfg.json dict + tensors); this one maps a
CrossCoder to and from them: W_enc [2D, F] <-> [2, D, F], W_dec [F, 2D] <-> [2, F, D],
b_dec [2D] <-> [2, D]."""

from __future__ import annotations

from pathlib import Path

import torch

from sae_transfer.diffing.crosscoder import ARCHITECTURE, MODELS, CrossCoder
from sae_transfer.errors import UserError
from sae_transfer.storage.crosscoder_format import CFG_FILE, read_crosscoder_folder, write_crosscoder_folder


def save_crosscoder(cc: CrossCoder, folder: str | Path, metadata: dict | None = None) -> Path:
    """Write `cc` to `folder` atomically; `metadata` is merged over cc.cfg.metadata. Returns the folder."""
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
    return write_crosscoder_folder(folder, cfg, tensors)


def load_crosscoder(folder: str | Path) -> CrossCoder:
    """The CrossCoder (on the CPU) of a folder written by `save_crosscoder`; UserError for a
    missing file, key, bad shape or another architecture."""
    cfg, tensors = read_crosscoder_folder(folder)
    if cfg.get("architecture") != ARCHITECTURE:
        raise UserError(f"{Path(folder) / CFG_FILE}: architecture {cfg.get('architecture')!r} is not {ARCHITECTURE!r}")
    D, F = int(cfg["d_model"]), int(cfg["d_sae"])
    cc = CrossCoder.create(D, F, int(cfg["k"]), metadata=cfg.get("metadata") or {})
    with torch.no_grad():
        cc.W_enc.copy_(tensors["W_enc"].reshape(2 * D, F))
        cc.b_enc.copy_(tensors["b_enc"])
        cc.W_dec.copy_(tensors["W_dec"].transpose(0, 1).reshape(F, 2 * D))
        cc.b_dec.copy_(tensors["b_dec"].reshape(2 * D))
        cc.threshold.copy_(tensors["threshold"])
        cc.scales_M.copy_(tensors["scales"])
    return cc
