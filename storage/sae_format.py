"""SAE folders in the layout SAELens 6 saves and loads.

    <folder>/cfg.json                 architecture, d_in, d_sae, dtype, ..., metadata{...}
    <folder>/sae_weights.safetensors  W_enc [d_in,d_sae], b_enc [d_sae], W_dec [d_sae,d_in],
                                      b_dec [d_in] (+ threshold [d_sae] for jumprelu)
    <folder>/sparsity.safetensors     optional: `sparsity` [d_sae], log10 feature density

Weights are stored for raw activations: the training scale factor is folded in
(`sae_transfer.sae.scaling.fold_scale`) and recorded as metadata.activation_scale_factor.

This module reads and writes the folder only (the cfg.json dict and the tensors, checked
against the shapes above); building an SAE from them, and folding scales, is
`sae_transfer.sae.io`'s job.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_transfer.errors import UserError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAE_LENS_VERSION = "6.0.0"  # the SAELens major version whose layout we write
# metadata fields SAELens expects; written with these defaults when the caller does not know them
METADATA_DEFAULTS = {
    "sae_lens_version": SAE_LENS_VERSION,
    "sae_lens_training_version": SAE_LENS_VERSION,
    "model_name": None,
    "hook_name": None,
    "hook_head_index": None,
    "model_class_name": "HookedTransformer",
    "model_from_pretrained_kwargs": {},
    "prepend_bos": True,
    "context_size": None,
    "dataset_path": None,
    "seqpos_slice": [None],
    "exclude_special_tokens": False,
    "sequence_separator_token": "bos",
    "disable_concat_sequences": False,
}
SCALE_KEY = "activation_scale_factor"  # metadata key: the factor s_train raw activations were multiplied by in training
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def folder_cfg(architecture: str, d_in: int, d_sae: int, dtype: str, apply_b_dec_to_input: bool,
               metadata: dict, k: int | None = None) -> dict:
    """cfg.json of an SAE whose weights read raw activations (any scale already folded in);
    `metadata` is merged over METADATA_DEFAULTS."""
    cfg = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "none",  # the scale factor is folded into the weights
        "reshape_activations": "none",
        "metadata": {**METADATA_DEFAULTS, **metadata},
    }
    if architecture == "topk":
        cfg["k"] = k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


def write_sae_folder(folder: str | Path, cfg: dict, tensors: dict[str, torch.Tensor],
                     log10_density_F: torch.Tensor | None = None) -> Path:
    """Write cfg.json, the tensors (in cfg's dtype, on the CPU) and optionally the log10
    feature density to `folder` atomically (temp folder, then rename). Returns the folder."""
    folder = Path(folder)
    dtype = _DTYPES.get(cfg.get("dtype"), torch.float32)
    tensors = {name: t.detach().to(dtype).contiguous().cpu() for name, t in tensors.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    save_file(tensors, tmp / WEIGHTS_FILE)
    if log10_density_F is not None:
        save_file({"sparsity": log10_density_F.detach().float().contiguous().cpu()}, tmp / SPARSITY_FILE)
    (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def read_cfg(folder: str | Path) -> dict:
    """cfg.json of an SAE folder; UserError for a missing file, bad JSON or a missing key
    (architecture, d_in, d_sae). Which architectures are supported is the caller's call."""
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder} is not an SAE folder: it needs {CFG_FILE} and {WEIGHTS_FILE} (SAELens 6 layout)")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{folder / CFG_FILE} is not valid JSON ({exc}); re-save the SAE") from exc
    missing = [k for k in ("architecture", "d_in", "d_sae") if k not in cfg]
    if missing:
        raise UserError(f"{folder / CFG_FILE} lacks {', '.join(missing)}; re-save the SAE in SAELens 6 layout")
    return cfg


def _read_weights(folder: Path) -> dict:
    """The weights file's tensors; UserError naming the file when it is truncated or not safetensors."""
    try:
        return load_file(str(folder / WEIGHTS_FILE))
    except SafetensorError as exc:
        raise UserError(f"{folder / WEIGHTS_FILE} is damaged ({str(exc).splitlines()[0]}): re-copy or re-train the SAE") from None


def _check_tensors(folder: Path, tensors: dict, cfg: dict) -> None:
    d, f = int(cfg["d_in"]), int(cfg["d_sae"])
    expected = {"W_enc": (d, f), "b_enc": (f,), "W_dec": (f, d), "b_dec": (d,)}
    if cfg["architecture"] == "jumprelu":
        expected["threshold"] = (f,)
    for name, shape in expected.items():
        if name not in tensors:
            raise UserError(f"{folder / WEIGHTS_FILE} lacks tensor {name!r} (has {sorted(tensors)}); re-save the SAE")
        if tuple(tensors[name].shape) != shape:
            raise UserError(
                f"{folder / WEIGHTS_FILE}: {name} has shape {tuple(tensors[name].shape)}, "
                f"cfg.json (d_in={d}, d_sae={f}) needs {shape}; the weights and cfg.json do not belong together"
            )


# SAELens's normalize_activations modes and what each needs at inference (SAELens 6, sae.py):
#   none                      the weights read raw activations
#   expected_average_only_in  the weights read x * s, s = sqrt(d_in) / E||x|| estimated in training;
#                             SAELens folds s into the weights when it knows it. So do we, when the
#                             folder records it (metadata.activation_scale_factor); else we refuse.
#   constant_norm_rescale     x * sqrt(d_in) / ||x|| per token in, the inverse on the way out
#   layer_norm                (x - mean) / std per token in, * std + mean out
# The last two are per token and cannot be folded into weights: refused.
NORMALIZE_MODES = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


def input_scale(folder: str | Path, cfg: dict) -> float | None:
    """The factor the weights expect raw activations to be multiplied by (None: raw).

    Raises UserError for a mode this loader cannot honour, or a scale it cannot find."""
    where = Path(folder) / CFG_FILE
    mode = cfg.get("normalize_activations") or "none"
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise UserError(f"{where}: reshape_activations={cfg['reshape_activations']!r} is not supported; "
                        "use an SAE on a [batch, pos, d] hook such as blocks.L.hook_resid_pre")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise UserError(f"{where}: rescale_acts_by_decoder_norm=true is not supported; fold the decoder norms "
                        "into the weights (SAELens fold_W_dec_norm) and set it to false")
    if mode == "none":
        return None
    if mode == "expected_average_only_in":
        s = (cfg.get("metadata") or {}).get(SCALE_KEY)
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 < s < float("inf"):
            raise UserError(
                f"{where}: normalize_activations='expected_average_only_in' but metadata.{SCALE_KEY} is {s!r}; "
                "record the training scaling factor sqrt(d_in)/E||x|| there (SAELens: norm_scaling_factor) "
                "or fold it into the weights and set normalize_activations to 'none'")
        return float(s)
    if mode in NORMALIZE_MODES:
        raise UserError(
            f"{where}: normalize_activations={mode!r} rescales each token by its own statistics at "
            "inference, which this project does not implement; use an SAE saved with 'none' or "
            "'expected_average_only_in'")
    raise UserError(f"{where}: normalize_activations={mode!r} is unknown; use one of {', '.join(NORMALIZE_MODES)}")


def read_tensors(folder: str | Path, cfg: dict) -> dict[str, torch.Tensor]:
    """The weights of an SAE folder (as stored), checked against cfg.json's d_in and d_sae; a
    SAELens `log_threshold` is returned as `threshold`. UserError for a damaged file, a missing
    tensor or a wrong shape."""
    folder = Path(folder)
    tensors = _read_weights(folder)
    if cfg["architecture"] == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    _check_tensors(folder, tensors, cfg)
    return tensors


def load_log10_density(folder: str | Path) -> torch.Tensor | None:
    """log10 feature density [F] from sparsity.safetensors, or None if the folder has none."""
    path = Path(folder) / SPARSITY_FILE
    return load_file(str(path))["sparsity"] if path.is_file() else None
