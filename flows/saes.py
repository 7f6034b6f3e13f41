"""The study's SAEs as a piece of DAG that more than one flow submits: both models cached at
every hook, the base, chat and fine-tuned SAEs of each hook, and the pair's outlier threshold.
A flow that needs them (the study, a checkpoint evaluation) submits this and is served from
Prefect's content-keyed cache when they exist."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect.futures import PrefectFuture

from sae_transfer import plan, remote
from sae_transfer.model_shapes import study_shapes
from sae_transfer.storage.fingerprint import fingerprint, hash_payload
from sae_transfer.storage.layout import StudyLayout, slug
from sae_transfer.study import StudyConfig
from sae_transfer.tasks._cache import code_version
from sae_transfer.tasks.activations import cache_activations
from sae_transfer.tasks.evaluate import pair_threshold
from sae_transfer.tasks.records import ActsRecord, PairRecord
from sae_transfer.tasks.sae import TRAINING_CODE, finetune_sae, finetune_sae_live, train_sae, train_sae_live


def run_dir(layout: StudyLayout, role: str, hook: str, *key) -> str:
    """Run folder named by what determines the dictionary (inputs, settings, trainer code), so a
    changed input or a trainer fix never reuses a stale run."""
    return str(layout.sae_run(f"{role}-{slug(hook)}-{hash_payload(code_version(*TRAINING_CODE), *key)}"))


@dataclass
class StudySAEs:
    """What `submit_saes` submitted: activation records (role -> hook -> record; None when the
    SAEs trained live), SAE futures
    (hook -> role -> future; roles base, chat and, when fine-tuning is on, finetuned) and the
    pair's threshold futures (hook -> future)."""

    acts: dict[str, dict[str, ActsRecord]] | None
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


def training_source(config: StudyConfig) -> str:
    """'cache' or 'live': `sae.source`, with 'auto' resolved from the models' configurations and
    the results folder's free disk (`plan.training_source`)."""
    if config.sae.source != "auto":
        return config.sae.source
    pair = config.pair
    local = {role: str(remote.config_copy(spec)) for role, spec in (("base", pair.base), ("chat", pair.chat))
             if remote.is_remote(spec)}  # a model on a store: its config.json is all a plan reads
    return plan.training_source(config, study_shapes(config.model_copy(update={"pair": pair.model_copy(update=local)})))


def submit_saes(config: StudyConfig, pair: PairRecord) -> StudySAEs:
    """Submit the caches (when the SAEs train from them), every hook's SAEs and thresholds; waits
    only for the caches (training needs their records), never for an SAE."""
    source = training_source(config)
    sae = config.sae.model_copy(update={"source": source})  # 'auto' keys its SAEs as what it resolved to
    layout, settings = StudyLayout(config.results_dir), config.eval_settings
    caches = cache_pair(config, pair) if source == "cache" else {}
    thresholds = {h: pair_threshold.submit(pair.base, h, settings) for h in config.hooks}
    acts = {role: {a.hook: a for a in fut.result()} for role, fut in caches.items()}
    saes: dict[str, dict[str, PrefectFuture]] = {}
    for hook in config.hooks:
        if source == "cache":
            saes[hook] = _cached_saes(config, sae, layout, acts, hook)
        else:
            saes[hook] = _live_saes(config, sae, layout, pair, hook)
    return StudySAEs(acts=acts or None, saes=saes, thresholds=thresholds)


def _cached_saes(config: StudyConfig, sae, layout: StudyLayout, acts: dict, hook: str) -> dict[str, PrefectFuture]:
    by_role = {role: train_sae.submit(acts[role][hook], sae, role,
                                      run_dir(layout, role, hook, acts[role][hook].path, sae.model_dump(), config.seed),
                                      config.seed, device=config.device)
               for role in ("base", "chat")}
    if config.finetune.enabled:
        ft_dir = run_dir(layout, "finetuned", hook, acts["chat"][hook].path, sae.model_dump(),
                         config.finetune.model_dump(), config.seed)
        by_role["finetuned"] = finetune_sae.submit(by_role["base"], acts["chat"][hook], config.finetune, ft_dir,
                                                   config.seed, device=config.device)
    return by_role


def _live_saes(config: StudyConfig, sae, layout: StudyLayout, pair: PairRecord, hook: str) -> dict[str, PrefectFuture]:
    """SAEs trained on live activations: each run folder is named by the model's content, the
    corpus section, the SAE settings and the seed (what its stream and training depend on)."""
    models = {"base": pair.base, "chat": pair.chat}
    inputs = {role: (_content(spec), config.corpus.model_dump()) for role, spec in models.items()}
    by_role = {role: train_sae_live.submit(models[role], hook, config.corpus, config.loading, sae, role,
                                           run_dir(layout, role, hook, *inputs[role], sae.model_dump(), config.seed),
                                           config.seed)
               for role in ("base", "chat")}
    if config.finetune.enabled:
        ft_dir = run_dir(layout, "finetuned", hook, *inputs["chat"], sae.model_dump(), config.finetune.model_dump(),
                         config.seed)
        by_role["finetuned"] = finetune_sae_live.submit(by_role["base"], pair.chat, hook, config.corpus, config.loading,
                                                        config.finetune, sae.buffer_tokens, ft_dir, config.seed)
    return by_role


def _content(spec: str) -> str:
    """A model's identity for a run folder's name: its folder's content hash, or the Hub spec."""
    return fingerprint(spec) if Path(spec).expanduser().exists() else spec
