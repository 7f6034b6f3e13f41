"""Every path of a study's results folder, built in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sae_transfer.storage.store import RemotePath, location


def slug(text: str) -> str:
    """A file-name-safe short form of a model id or hook name."""
    text = text.rstrip("/").split("/")[-1] if "/" in text else text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


@dataclass(frozen=True)
class RunLayout:
    """One SAE training run folder, as `sae_transfer.training.run.train_sae` writes it."""

    root: Path

    SAE_DIR: ClassVar[str] = "sae"
    MANIFEST_FILE: ClassVar[str] = "run.json"
    CHECKPOINTS_DIR: ClassVar[str] = "checkpoints"
    TRAINING_LOG_DIR: ClassVar[str] = "training_log"

    @property
    def sae(self) -> Path:
        """The trained SAE: a SAELens 6 folder (cfg.json, sae_weights.safetensors, sparsity.safetensors)."""
        return self.root / self.SAE_DIR

    @property
    def manifest(self) -> Path:
        """JSON written last: config, tokens, timings, final metrics, parent SAE."""
        return self.root / self.MANIFEST_FILE

    @property
    def checkpoints(self) -> Path:
        """Trainer checkpoints, one folder per step (sae_transfer.storage.checkpoints)."""
        return self.root / self.CHECKPOINTS_DIR

    @property
    def training_log(self) -> Path:
        """Parquet parts of the training log (sae_transfer.storage.checkpoints.append_log_rows)."""
        return self.root / self.TRAINING_LOG_DIR

    @classmethod
    def holding(cls, sae_dir: str | Path) -> RunLayout | None:
        """The run whose SAE folder is `sae_dir`, or None for an SAE folder outside a run."""
        sae_dir = Path(sae_dir)
        return cls(sae_dir.parent) if sae_dir.name == cls.SAE_DIR else None


@dataclass(frozen=True)
class StudyLayout:
    """Paths under one study's results folder (`results/<study name>` by default), a local
    folder or an object-store prefix (`s3://bucket/prefix/<study name>`; see storage.store)."""

    root: Path | RemotePath

    CATALOG_FILE: ClassVar[str] = "study.duckdb"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", location(self.root))

    @property
    def activations(self) -> Path:
        """Parquet activation datasets, one content-addressed folder per (model, hook, corpus, budget)."""
        return self.root / "activations"

    SAES_DIR: ClassVar[str] = "saes"

    @property
    def saes(self) -> Path:
        """Trained and fine-tuned SAE run folders (each a RunLayout)."""
        return self.root / self.SAES_DIR

    def sae_run(self, name: str) -> Path:
        """The run folder of the SAE called `name` (see RunLayout for what is inside)."""
        return self.saes / name

    @classmethod
    def in_every_run(cls, *parts: str) -> str:
        """Glob, relative to the root, of `parts` inside every SAE run folder (catalog views)."""
        return "/".join([cls.SAES_DIR, "*", *parts])

    @classmethod
    def run_name_regex(cls) -> str:
        """Regular expression whose group 1 is the run folder's name in a path below `saes/`."""
        return f"{cls.SAES_DIR}/([^/]+)/"

    def table(self, name: str) -> Path:
        """Folder of Parquet part files of one result table (metrics, outliers, ...)."""
        return self.root / name

    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def catalog(self) -> Path | RemotePath:
        """The DuckDB file holding the result tables and their views (storage.catalog)."""
        return self.root / self.CATALOG_FILE

