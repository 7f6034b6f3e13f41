"""The study's SAEs as a piece of DAG that more than one flow submits: both models cached at
every hook, the base, chat and fine-tuned SAEs of each hook, and the pair's outlier threshold.
A flow that needs them (the study, a checkpoint evaluation) submits this and is served from
Prefect's content-keyed cache when they exist."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect.futures import PrefectFuture

from sae_transfer import plan, remote
from sae_transfer.flows._runs import runner_workers
from sae_transfer.model_shapes import study_shapes
from sae_transfer.storage.fingerprint import fingerprint, hash_payload
from sae_transfer.storage.layout import StudyLayout, slug
from sae_transfer.study import StudyConfig
from sae_transfer.tasks._cache import code_version
from sae_transfer.tasks.activations import (
    activation_ranges,
    cache_activation_range,
    cache_activations,
    merge_activation_ranges,
)
from sae_transfer.tasks.evaluate import pair_threshold
from sae_transfer.tasks.records import ActsRecord, PairRecord
from sae_transfer.tasks.sae import TRAINING_CODE, finetune_sae, finetune_saes_live, train_sae, train_saes_live


def run_dir(layout: StudyLayout, role: str, hook: str, *key) -> str:
    """Run folder named by what determines the dictionary (inputs, settings, trainer code), so a
    changed input or a trainer fix never reuses a stale run."""
    return str(layout.sae_run(f"{role}-{slug(hook)}-{hash_payload(code_version(*TRAINING_CODE), *key)}"))


class Pick:
    """Item `index` of a task future whose result is a list (one SAE of a group trained from one
    stream); resolved when asked, so submitting downstream work never waits for training."""

    def __init__(self, future: PrefectFuture, index: int):
        self.future, self.index = future, index

    def result(self):
        return self.future.result()[self.index]


@dataclass
class StudySAEs:
    """What `submit_saes` submitted: activation records (role -> hook -> record; None when the
    SAEs trained live), SAEs (hook -> key -> future or Pick; keys `base`, `chat`, `finetuned`, each
    suffixed `[variant]` for a sweep's SAEs) and the pair's threshold futures (hook -> future)."""

    acts: dict[str, dict[str, ActsRecord]] | None
    saes: dict[str, dict[str, PrefectFuture | Pick]]
    thresholds: dict[str, PrefectFuture]
    first_variant: str | None = None  # label of the sweep's first variant (None: no sweep)

    def of(self, hook: str) -> list:
        """Every SAE of `hook` (the transfer matrix covers them all), variant by variant in the
        sweep's order, each as base, chat, fine-tuned. A future is passed on as it is; one SAE
        of a group trained from one stream waits for its group."""
        return [s.result() if isinstance(s, Pick) else s for s in self.saes[hook].values()]

    def primary(self, hook: str) -> list:
        """The first variant's base, chat and fine-tuned SAEs (the study's own without a sweep):
        the ones the diffing stage compares."""
        keys = [_key(role, self.first_variant) for role in ("base", "chat", "finetuned")]
        return [s.result() if isinstance(s, Pick) else s for k, s in self.saes[hook].items() if k in keys]


def _key(role: str, variant: str | None) -> str:
    return f"{role}[{variant}]" if variant else role


def cache_pair(config: StudyConfig, pair: PairRecord, corpus=None, wait_for=None) -> dict[str, PrefectFuture]:
    """Both models cached at every hook on `corpus` (default: the study's): role -> future. On a
    Dask runner each cache is split by sequence range over the workers (`cache_model`)."""
    return {role: cache_model(config, model, rev, corpus or config.corpus, wait_for=(wait_for or {}).get(role))
            for role, model, rev in (("base", pair.base, config.pair.base_revision),
                                     ("chat", pair.chat, config.pair.chat_revision))}


def cache_model(config: StudyConfig, model: str, revision: str | None, corpus, wait_for=None) -> PrefectFuture:
    """One model's cache at every hook: one `cache-activations` task, or, on a Dask runner with
    several workers, one `cache-activation-range` task per sequence range (cut where a single
    writer closes a shard, so the dataset is the one a single writer writes) and the
    `merge-activation-ranges` task that writes its manifest."""
    out_dir = str(StudyLayout(config.results_dir).activations)
    args = (model, config.hooks, corpus, config.loading, config.act_dtype, out_dir)
    writers = runner_workers(config.runner) if config.runner.kind == "dask" else 1
    ranges = (activation_ranges(model, config.hooks, corpus, config.loading, config.act_dtype, writers, revision=revision)
              if writers > 1 else [])
    if len(ranges) < 2:
        return cache_activations.submit(*args, revision=revision, wait_for=wait_for)
    parts = [cache_activation_range.submit(*args, start, stop, revision=revision, wait_for=wait_for) for start, stop in ranges]
    return merge_activation_ranges.submit(*args, ranges=parts, revision=revision)


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
    """Submit the caches (when the SAEs train from them), every hook's SAEs (every variant of
    `sae.sweep`) and thresholds; waits only for the caches (training needs their records),
    never for an SAE."""
    source = training_source(config)
    sae = config.sae.model_copy(update={"source": source})  # 'auto' keys its SAEs as what it resolved to
    layout, settings = StudyLayout(config.results_dir), config.eval_settings
    caches = cache_pair(config, pair) if source == "cache" else {}
    thresholds = {h: pair_threshold.submit(pair.base, h, settings) for h in config.hooks}
    acts = {role: {a.hook: a for a in fut.result()} for role, fut in caches.items()}
    if source == "cache":
        saes = {hook: _cached_saes(config, sae, layout, acts, hook) for hook in config.hooks}
    else:
        saes = _live_saes(config, sae, layout, pair)
    return StudySAEs(acts=acts or None, saes=saes, thresholds=thresholds, first_variant=sae.variants()[0][0])


def _cached_saes(config: StudyConfig, sae, layout: StudyLayout, acts: dict, hook: str) -> dict[str, PrefectFuture]:
    out: dict[str, PrefectFuture] = {}
    for variant, vsae in sae.variants():
        by_role = {role: train_sae.submit(acts[role][hook], vsae, role,
                                          run_dir(layout, role, hook, acts[role][hook].path, vsae.model_dump(), config.seed),
                                          config.seed, device=config.device, variant=variant)
                   for role in ("base", "chat")}
        if config.finetune.enabled:
            ft_dir = run_dir(layout, "finetuned", hook, acts["chat"][hook].path, vsae.model_dump(),
                             config.finetune.model_dump(), config.seed)
            by_role["finetuned"] = finetune_sae.submit(by_role["base"], acts["chat"][hook], config.finetune, ft_dir,
                                                       config.seed, device=config.device)
        out.update({_key(role, variant): fut for role, fut in by_role.items()})
    return out


def _live_saes(config: StudyConfig, sae, layout: StudyLayout, pair: PairRecord) -> dict[str, dict[str, Pick]]:
    """SAEs trained on live activations, every hook and every variant of a model from one stream
    (one `train-saes-live` task per model, one `finetune-saes-live` for the fine-tunes). Each run
    folder is named by the model's content, the corpus section, the SAE settings and the seed
    (what its stream and training depend on)."""
    models = {"base": pair.base, "chat": pair.chat}
    inputs = {role: (_content(spec), config.corpus.model_dump()) for role, spec in models.items()}
    planned = [(hook, variant, vsae) for hook in config.hooks for variant, vsae in sae.variants()]

    def runs(role: str) -> list[dict]:
        return [{"hook": hook, "variant": variant, "sae": vsae,
                 "out_dir": run_dir(layout, role, hook, *inputs[role], vsae.model_dump(), config.seed)}
                for hook, variant, vsae in planned]

    groups = {role: train_saes_live.submit(models[role], config.corpus, config.loading, runs(role), role,
                                           sae.buffer_tokens, config.seed)
              for role in ("base", "chat")}
    if config.finetune.enabled:
        ft_dirs = [run_dir(layout, "finetuned", hook, *inputs["chat"], vsae.model_dump(), config.finetune.model_dump(),
                           config.seed) for hook, _, vsae in planned]
        groups["finetuned"] = finetune_saes_live.submit(groups["base"], pair.chat, config.corpus, config.loading,
                                                        config.finetune, sae.buffer_tokens, ft_dirs, config.seed)
    saes: dict[str, dict[str, Pick]] = {hook: {} for hook in config.hooks}
    for i, (hook, variant, _) in enumerate(planned):
        for role, group in groups.items():
            saes[hook][_key(role, variant)] = Pick(group, i)
    return saes


def _content(spec: str) -> str:
    """A model's identity for a run folder's name: its folder's content hash, or the Hub spec."""
    return fingerprint(spec) if Path(spec).expanduser().exists() else spec
