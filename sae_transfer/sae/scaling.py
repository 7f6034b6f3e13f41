"""Folding an activation scale factor into SAE weights.

An SAE trained on s·x (activations scaled to mean norm √d_model) is turned into one that
reads raw x and writes raw x̂: W_enc ← s·W_enc, W_dec ← W_dec / s, b_dec ← b_dec / s.
Feature activations (and so thresholds) are unchanged. Folding with 1/s undoes it."""

from __future__ import annotations

import copy

import torch

from sae_transfer.sae.base import SAE


def fold_scale(sae: SAE, scale: float) -> SAE:
    """A copy of `sae` that takes activations `scale` times smaller than `sae` does, with the
    same features; used with the training scale s to save an SAE that works on raw activations."""
    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.W_enc.mul_(scale)
        out.W_dec.div_(scale)
        out.b_dec.div_(scale)
    return out
