"""finetune_sae: fine-tune an existing SAE on another model's activations (the study's recipe)."""

from __future__ import annotations

from prefect import flow

from sae_transfer.storage.fingerprint import hash_payload
from sae_transfer.storage.layout import StudyLayout, slug
from sae_transfer.study import StudyConfig
from sae_transfer.tasks._cache import code_version
from sae_transfer.tasks.activations import cache_activations
from sae_transfer.tasks.records import SAERecord
from sae_transfer.tasks.sae import TRAINING_CODE
from sae_transfer.tasks.sae import finetune_sae as finetune_task


@flow(name="finetune_sae", log_prints=True)
def finetune_sae(config: StudyConfig, sae: str, model: str, hook: str) -> dict:
    """Cache `model`'s activations at `hook` (or reuse them) and fine-tune the SAE at `sae` on them."""
    layout = StudyLayout(config.results_dir)
    acts = next(a for a in cache_activations(model, [hook], config.corpus, config.loading, config.act_dtype,
                                             str(layout.activations)) if a.hook == hook)
    parent = SAERecord(path=sae, run_dir=sae, model="", hook=hook, role="parent")
    key = hash_payload(code_version(*TRAINING_CODE), acts.path, sae, config.finetune.model_dump(), config.seed)
    out = str(layout.sae_run(f"finetuned-{slug(hook)}-{key}"))
    record = finetune_task(parent, acts, config.finetune, out, config.seed, device=config.device)
    return record.model_dump()
