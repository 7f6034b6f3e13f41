"""The study's SAEs as a piece of DAG that more than one flow submits: both models cached at
every hook, the base, chat and fine-tuned SAEs of each hook, and the pair's outlier threshold.
A flow that needs them (the study, a checkpoint evaluation) submits this and is served from
Prefect's content-keyed cache when they exist."""

from __future__ import annotations

from dataclasses import dataclass

from prefect.futures import PrefectFuture

from sae_transfer.storage.fingerprint import hash_payload
from sae_transfer.storage.layout import StudyLayout, slug
from sae_transfer.study import StudyConfig
from sae_transfer.tasks._cache import code_version
from sae_transfer.tasks.activations import cache_activations
from sae_transfer.tasks.evaluate import pair_threshold
from sae_transfer.tasks.records import ActsRecord, PairRecord
from sae_transfer.tasks.sae import TRAINING_CODE, finetune_sae, train_sae


def run_dir(layout: StudyLayout, role: str, hook: str, *key) -> str:
    """Run folder named by what determines the dictionary (inputs, settings, trainer code), so a
    changed input or a trainer fix never reuses a stale run."""
    return str(layout.sae_run(f"{role}-{slug(hook)}-{hash_payload(code_version(*TRAINING_CODE), *key)}"))


@dataclass
class StudySAEs:
    """What `submit_saes` submitted: activation records (role -> hook -> record), SAE futures
    (hook -> role -> future; roles base, chat and, when fine-tuning is on, finetuned) and the
    pair's threshold futures (hook -> future)."""

    acts: dict[str, dict[str, ActsRecord]]
    saes: dict[str, dict[str, PrefectFuture]]
    thresholds: dict[str, PrefectFuture]

    def of(self, hook: str) -> list[PrefectFuture]:
        """The SAEs of `hook` in the study's order: base, chat, fine-tuned."""
        return list(self.saes[hook].values())


def cache_pair(config: StudyConfig, pair: PairRecord, corpus=None, wait_for=None) -> dict[str, PrefectFuture]:
    """Both models cached at every hook on `corpus` (default: the study's): role -> future."""
    out_dir = str(StudyLayout(config.results_dir).activations)
    return {role: cache_activations.submit(model, config.hooks, corpus or config.corpus, config.loading, config.act_dtype,
                                           out_dir, revision=rev, wait_for=(wait_for or {}).get(role))
            for role, model, rev in (("base", pair.base, config.pair.base_revision),
                                     ("chat", pair.chat, config.pair.chat_revision))}


def submit_saes(config: StudyConfig, pair: PairRecord) -> StudySAEs:
    """Submit the caches, every hook's SAEs and thresholds; waits only for the caches (training
    needs their records), never for an SAE."""
    layout, settings = StudyLayout(config.results_dir), config.eval_settings
    caches = cache_pair(config, pair)
    thresholds = {h: pair_threshold.submit(pair.base, h, settings) for h in config.hooks}
    acts = {role: {a.hook: a for a in fut.result()} for role, fut in caches.items()}
    saes: dict[str, dict[str, PrefectFuture]] = {}
    for hook in config.hooks:
        by_role = saes[hook] = {
            role: train_sae.submit(acts[role][hook], config.sae, role,
                                   run_dir(layout, role, hook, acts[role][hook].path, config.sae.model_dump(), config.seed),
                                   config.seed, device=config.device)
            for role in ("base", "chat")}
        if config.finetune.enabled:
            ft_dir = run_dir(layout, "finetuned", hook, acts["chat"][hook].path, config.sae.model_dump(),
                             config.finetune.model_dump(), config.seed)
            by_role["finetuned"] = finetune_sae.submit(by_role["base"], acts["chat"][hook], config.finetune, ft_dir,
                                                       config.seed, device=config.device)
    return StudySAEs(acts=acts, saes=saes, thresholds=thresholds)
