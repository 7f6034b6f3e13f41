"""Small typed records the tasks return (paths and numbers, never tensors). They are
JSON-serialised by Prefect's result store and hashed into downstream cache keys."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)

    # Fields that report what a call did (reused a dataset, built the pair), not what the record
    # names: cache keys of downstream tasks leave them out, so a reuse never re-runs a dependent.
    STATUS_FIELDS: ClassVar[frozenset[str]] = frozenset({"reused", "built"})


class PairRecord(_Record):
    """The model pair a study runs on."""

    base: str  # base model spec (Hub id or local folder)
    chat: str  # chat model spec
    checkpoints: str | None  # folder of fine-tuning checkpoints, if any
    built: bool  # True when this call built the demo pair


class ActsRecord(_Record):
    """One cached activation dataset."""

    path: str  # dataset folder
    model: str  # model spec the activations came from
    hook: str
    n_tokens: int
    reused: bool  # True when the dataset already existed


class SAERecord(_Record):
    """One trained (or fine-tuned) SAE."""

    path: str  # SAELens-layout folder (cfg.json + sae_weights.safetensors)
    run_dir: str  # training run folder (checkpoints, training log, run.json)
    model: str  # model spec whose activations it was trained on
    hook: str
    role: str  # "base", "chat" or "finetuned"
    finetuned_from: str | None = None  # parent SAE folder for fine-tunes
    tokens: int = 0  # tokens trained on
    final_metrics: dict = {}
    variant: str | None = None  # the swept settings that set it apart (sae.sweep), e.g. "l1_coefficient=2"


class RowsRecord(_Record):
    """Rows appended to one or more result tables."""

    step: str  # DAG step that produced them
    rows: dict[str, int]  # table name -> rows appended


class DiffRecord(RowsRecord):
    """Rows of the SAE diffing, and the latents the causal check ablates."""

    chosen: dict  # {"sae_id", "set_name", "latents"}: see `sae_transfer.diffing.stage.chosen_latents`
