"""Entry points for the CLI and the pipeline tasks: train or fine-tune an SAE on one cached
activation dataset into a run folder (see `run.train_sae` for the folder layout)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sae_transfer.errors import UserError
from sae_transfer.training.config import RUNTIME_FIELDS, TrainConfig, finetune_defaults
from sae_transfer.training.data import open_training_data
from sae_transfer.training.run import Parent, RunResult, parent_sae_arch, train_sae


def _config(**fields) -> TrainConfig:
    try:
        return TrainConfig(**{k: v for k, v in fields.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad training settings: {exc}") from None


def train_on_dataset(
    acts_path: str | Path,
    out_dir: str | Path,
    arch: str = "relu",
    expansion: int | None = 16,
    d_sae: int | None = None,
    tokens: int = 1_000_000,
    l1_coefficient: float | None = None,
    k: int | None = None,
    lr: float | None = None,
    batch_size: int = 4096,
    seed: int = 0,
    buffer_tokens: int = 262_144,
    progress: bool = False,
    **overrides,
) -> RunResult:
    """Train an SAE (d_sae = d_sae, or expansion × d_model) on a cached dataset; resumable.
    `overrides` are further TrainConfig fields. Returns the RunResult (sae_dir, metrics, ...)."""
    data = open_training_data(acts_path, batch_size, seed=seed, buffer_tokens=buffer_tokens)
    cfg = _config(
        arch=arch, d_sae=d_sae or expansion * data.d_in, total_tokens=tokens, batch_size=batch_size, seed=seed,
        l1_coefficient=l1_coefficient, k=k, lr=lr, **overrides,
    )
    return train_sae(cfg, data.make_source, data.d_in, out_dir, metadata=data.metadata, progress=progress)


def finetune_on_dataset(
    parent_sae: str | Path,
    acts_path: str | Path,
    out_dir: str | Path,
    tokens: int = 5_000_000,
    batch_size: int = 256,
    seed: int = 0,
    lr: float | None = None,
    l1_coefficient: float | None = None,
    buffer_tokens: int = 262_144,
    progress: bool = False,
    **overrides,
) -> RunResult:
    """Fine-tune the SAE folder `parent_sae` on another model's activations with the seed
    study's recipe (finetune_defaults): LR and sparsity coefficient from the parent's run.json
    unless given. run.json records the parent's path and weights hash."""
    from sae_transfer.storage.fingerprint import sha256_file
    from sae_transfer.sae.io import load_sae
    from sae_transfer.storage.sae_format import WEIGHTS_FILE

    parent_sae = Path(parent_sae)
    base = load_sae(parent_sae)
    fields = dict(
        arch=parent_sae_arch(parent_sae), d_sae=base.d_sae, total_tokens=tokens, batch_size=batch_size, seed=seed,
        k=base.cfg.k or TrainConfig.k, lr=lr, l1_coefficient=l1_coefficient, **overrides,
    )
    try:
        cfg = finetune_defaults(parent_config(parent_sae), **{k: v for k, v in fields.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad fine-tuning settings: {exc}") from None
    data = open_training_data(acts_path, cfg.batch_size, seed=seed, buffer_tokens=buffer_tokens)
    parent = Parent(path=parent_sae.resolve(), weights_sha256=sha256_file(parent_sae / WEIGHTS_FILE))
    return train_sae(cfg, data.make_source, data.d_in, out_dir, metadata=data.metadata, parent=parent, progress=progress)


def parent_config(sae_dir: Path) -> TrainConfig:
    """The TrainConfig of the run that produced `sae_dir` (its run.json), or the defaults."""
    from sae_transfer.storage.layout import RunLayout

    run = RunLayout.holding(sae_dir)
    if run is not None and run.manifest.is_file():
        recorded = json.loads(run.manifest.read_text()).get("config") or {}
        known = {f.name for f in dataclasses.fields(TrainConfig)} - set(RUNTIME_FIELDS)  # the child picks its own device
        return TrainConfig.from_dict({k: v for k, v in recorded.items() if k in known})
    return TrainConfig()
