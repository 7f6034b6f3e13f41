"""Every path of a study's results folder, built in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


def slug(text: str) -> str:
    """A file-name-safe short form of a model id or hook name."""
    text = text.rstrip("/").split("/")[-1] if "/" in text else text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


@dataclass(frozen=True)
class StudyLayout:
    """Paths under one study's results folder (`results/<study name>` by default)."""

    root: Path

    @property
    def activations(self) -> Path:
        """Parquet activation datasets, one content-addressed folder per (model, hook, corpus, budget)."""
        return self.root / "activations"

    @property
    def saes(self) -> Path:
        """Trained and fine-tuned SAE run folders (SAELens layout inside)."""
        return self.root / "saes"

    def sae_run(self, name: str) -> Path:
        return self.saes / name

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
    def catalog(self) -> Path:
        """The DuckDB file holding views over the Parquet tables."""
        return self.root / "study.duckdb"

    @property
    def schema_stubs(self) -> Path:
        """Zero-row Parquet files giving empty tables their columns."""
        return self.root / ".catalog"

    @property
    def study_state(self) -> Path:
        """JSON naming the SAEs the study trained, per hook (what evaluate_checkpoint re-uses)."""
        return self.root / "study_state.json"
