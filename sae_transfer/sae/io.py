"""Save and load an `SAE` as a SAELens 6 folder (layout: sae_transfer.storage.sae_format).

The storage module reads and writes the folder (cfg.json dict + tensors); this one maps an SAE
to and from them: a BatchTopK SAE is saved as the JumpReLU it is at inference, the training
scale factor is folded into the weights on save, and a folder that records a scale to apply
to raw activations has it folded in on load."""

from __future__ import annotations

from pathlib import Path

import torch

from sae_transfer.errors import UserError
from sae_transfer.sae import ARCHITECTURES, SAE, SAEConfig, make_sae
from sae_transfer.sae.batchtopk import BatchTopKSAE
from sae_transfer.sae.scaling import SCALE_KEY, fold_scale
from sae_transfer.storage.sae_format import CFG_FILE, folder_cfg, input_scale, read_cfg, read_tensors, write_sae_folder


def save_sae(
    sae: SAE,
    folder: str | Path,
    scale_factor: float = 1.0,
    metadata: dict | None = None,
    log10_density_F: torch.Tensor | None = None,
) -> Path:
    """Write `sae` (trained on activations multiplied by `scale_factor`) as a SAELens 6 folder
    that works on raw activations; atomic (temp folder, then rename). Returns the folder."""
    if isinstance(sae, BatchTopKSAE):
        sae = sae.to_jumprelu()
    if scale_factor != 1.0:
        sae = fold_scale(sae, scale_factor)
    meta = {**sae.cfg.metadata, **(metadata or {})}
    meta[SCALE_KEY] = float(scale_factor)  # raw x was multiplied by this in training
    cfg = folder_cfg(sae.cfg.architecture, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.dtype, sae.cfg.apply_b_dec_to_input,
                     meta, k=sae.cfg.k)
    return write_sae_folder(folder, cfg, sae.state_dict(), log10_density_F)


def load_sae(folder: str | Path, expect_d_in: int | None = None, expect_hook: str | None = None) -> SAE:
    """Load an SAE folder written by `save_sae` or by SAELens 6 (standard, topk, jumprelu).

    Returns a float32 SAE that reads raw activations; cfg.metadata carries cfg.json's metadata.
    A folder with normalize_activations='expected_average_only_in' has its recorded scale
    folded in (then metadata.activation_scale_factor is s_train, as for our own SAEs); modes
    that cannot be folded are refused. Raises UserError for a missing file or key, a wrong
    shape, a d_in / hook mismatch, or a normalisation this loader cannot honour."""
    folder = Path(folder)
    cfg = read_cfg(folder)
    if cfg["architecture"] not in ARCHITECTURES:
        raise UserError(f"{folder}: architecture {cfg['architecture']!r} is not supported; use one of {sorted(ARCHITECTURES)}")
    scale = input_scale(folder, cfg)
    if expect_d_in is not None and int(cfg["d_in"]) != expect_d_in:
        raise UserError(f"{folder}: SAE d_in={cfg['d_in']} but the hooked activations have d_model={expect_d_in}; "
                        "pick an SAE trained on this model")
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    if expect_hook is not None and hook is not None and hook != expect_hook:
        raise UserError(f"{folder}: SAE was trained on hook {hook!r}, not {expect_hook!r}; pick the SAE for that hook")
    tensors = read_tensors(folder, cfg)
    if cfg["architecture"] == "topk" and not cfg.get("k"):
        raise UserError(f"{folder / CFG_FILE}: a topk SAE needs `k`; add it to cfg.json")
    sae_cfg = SAEConfig(
        architecture=cfg["architecture"],
        d_in=int(cfg["d_in"]),
        d_sae=int(cfg["d_sae"]),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        k=cfg.get("k"),
        dtype=cfg.get("dtype", "float32"),
        metadata=dict(cfg.get("metadata") or {}),
    )
    sae = make_sae(sae_cfg)
    sae.load_state_dict({k: v.float() for k, v in tensors.items() if k in sae.state_dict()})
    return fold_scale(sae, scale) if scale is not None else sae
