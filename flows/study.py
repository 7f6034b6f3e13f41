"""transfer_study: the whole DAG for one study config.

pair -> caches (base, chat) -> SAEs (base, chat) -> fine-tuned base SAE -> transfer matrix,
outliers, segments, position curves, weight diffs -> checkpoint drift -> report.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import wait

from sae_transfer.flows._runs import current_run_id, share_cpu_threads, step_timings
from sae_transfer.flows.watch import watch_checkpoints
from sae_transfer.study import StudyConfig
from sae_transfer.storage.checkpoints import write_json_atomic
from sae_transfer.storage.fingerprint import hash_payload
from sae_transfer.storage.layout import StudyLayout, slug
from sae_transfer.tasks.activations import cache_activations
from sae_transfer.tasks.diffing import causal_check, diff_crosscoder, diff_saes, train_crosscoder
from sae_transfer.tasks.evaluate import (evaluate_segments, evaluate_transfer, pair_threshold, position_curves, sae_paths, tag_outliers,
                            weight_diff)
from sae_transfer.tasks.models import prepare_pair
from sae_transfer.tasks.report import build_report, record_run
from sae_transfer.tasks._cache import code_version
from sae_transfer.tasks.sae import TRAINING_CODE, finetune_sae, train_sae


def _sae_dir(layout: StudyLayout, role: str, hook: str, *key) -> str:
    """Run folder named by what determines the SAE (inputs, settings, trainer code), so a changed
    input or a trainer fix never reuses a stale run."""
    return str(layout.sae_run(f"{role}-{slug(hook)}-{hash_payload(code_version(*TRAINING_CODE), *key)}"))


def _diffing_caches(config: StudyConfig, layout: StudyLayout, pair, opts: dict, after: dict) -> dict:
    """Both models cached on the diffing corpus (when it is not the study's): role -> hook -> record."""
    corpus = config.corpus.model_copy(update={"source": config.diffing.corpus, "train_tokens": config.diffing.tokens})
    futures = {role: cache_activations.submit(model, config.hooks, corpus, str(layout.activations), revision=rev,
                                              wait_for=[after[role]], **opts)
               for role, model, rev in (("base", pair.base, config.pair.base_revision), ("chat", pair.chat, config.pair.chat_revision))}
    return {role: {a.hook: a for a in fut.result()} for role, fut in futures.items()}


def _diffing(config: StudyConfig, layout: StudyLayout, chat: str, saes: list, base_acts, chat_acts, segments: list) -> list:
    """Submit the diffing stage of one hook: SAE latents, the crosscoder, the causal check."""
    hook = base_acts.hook
    diff = diff_saes.submit(saes, base_acts, chat_acts, config)
    out = [diff]
    if config.diffing.crosscoder:
        cc_dir = _sae_dir(layout, "crosscoder", hook, base_acts.path, chat_acts.path, config.diffing.model_dump(),
                          config.sae.batch_size, config.seed, code_version("sae_transfer.diffing"))
        crosscoder = train_crosscoder.submit(base_acts, chat_acts, config, cc_dir)
        out.append(diff_crosscoder.submit(crosscoder, base_acts, chat_acts, config))
    if config.diffing.causal and config.instructions.enabled:
        out.append(causal_check.submit(saes, chat, config, hook, [diff], wait_for=segments))
    return out


@flow(name="transfer_study", log_prints=True)
def transfer_study(config: StudyConfig) -> dict:
    """Run (or re-use) every step of the study and build the report; returns where it is."""
    started = time.perf_counter()
    share_cpu_threads(config)
    progress = create_progress_artifact(0.0, description=f"study {config.name}: caching activations")
    layout, results = StudyLayout(config.results_dir), str(config.results_dir)
    pair = prepare_pair(config.pair)
    opts = dict(act_dtype=config.act_dtype, model_dtype=config.dtype, device=config.device,
                trust_remote_code=config.pair.trust_remote_code)
    caches = {
        role: cache_activations.submit(model, config.hooks, config.corpus, str(layout.activations), revision=rev, **opts)
        for role, model, rev in (("base", pair.base, config.pair.base_revision), ("chat", pair.chat, config.pair.chat_revision))
    }
    pending = [weight_diff.submit(pair.base, pair.chat, results)]
    thresholds = {h: pair_threshold.submit(pair.base, config, h) for h in config.hooks}  # one cut-off per pair
    pending += [tag_outliers.submit(m, config, h, threshold=thresholds[h]) for m in (pair.base, pair.chat) for h in config.hooks]
    acts = {role: {a.hook: a for a in fut.result()} for role, fut in caches.items()}
    update_progress_artifact(progress, 20.0, description=f"study {config.name}: training SAEs")
    trained: dict[str, list[str]] = {}
    diff_caches = _diffing_caches(config, layout, pair, opts, caches) if config.diffing.enabled and config.diffing.corpus else {}
    for hook in config.hooks:
        saes = {
            role: train_sae.submit(acts[role][hook], config.sae, role, _sae_dir(layout, role, hook, acts[role][hook].path, config.sae.model_dump(), config.seed), config.seed,
                                  device=config.device)
            for role in ("base", "chat")
        }
        if config.finetune.enabled:
            ft_dir = _sae_dir(layout, "finetuned", hook, acts["chat"][hook].path, config.sae.model_dump(), config.finetune.model_dump(), config.seed)
            saes["finetuned"] = finetune_sae.submit(saes["base"], acts["chat"][hook], config.finetune, ft_dir, config.seed,
                                                    device=config.device)
        paths = trained[hook] = sae_paths([fut.result() for fut in saes.values()])
        thr = thresholds[hook]
        write_json_atomic(layout.study_state, {"saes": trained, "thresholds": {h: t.result() for h, t in thresholds.items() if h in trained}})
        pending += [evaluate_transfer.submit(paths, m, config, hook, threshold=thr) for m in (pair.base, pair.chat)]
        pending += [position_curves.submit(paths, m, config, hook, threshold=thr) for m in (pair.base, pair.chat)]
        segments = [evaluate_segments.submit(paths[:2], pair.chat, config, hook, threshold=thr)] if config.instructions.enabled else []
        pending += segments
        if config.diffing.enabled:
            diff_acts = {role: diff_caches[role][hook] for role in ("base", "chat")} if diff_caches else {r: acts[r][hook] for r in acts}
            pending += _diffing(config, layout, pair.chat, [fut.result() for fut in saes.values()],
                                diff_acts["base"], diff_acts["chat"], segments)
    update_progress_artifact(progress, 50.0, description=f"study {config.name}: evaluating transfer")
    wait(pending)
    for fut in pending:
        fut.result()  # surface the first failure
    update_progress_artifact(progress, 80.0, description=f"study {config.name}: checkpoints and report")
    drift = watch_checkpoints(config, via_deployment=False, build=False) if pair.checkpoints else {}
    report = build_report(config)
    update_progress_artifact(progress, 100.0, description=f"study {config.name}: done")
    timings = step_timings()
    steps = [cached for _, cached in timings.values() if cached is not None]
    timings["total"] = (time.perf_counter() - started, all(steps))
    record_run(config, "transfer_study", current_run_id(), timings)
    return {"report": report, "results": results, "seconds": round(time.perf_counter() - started, 1),
            "steps": len(steps), "cached_steps": sum(steps), "checkpoints": drift.get("evaluated", [])}


def run_study(config: StudyConfig) -> str:
    """Run `transfer_study` in this process (Prefect's ephemeral API) and describe the outcome."""
    out = transfer_study(config)
    return (f"study {config.name}: {out['steps']} steps ({out['cached_steps']} cached) in {out['seconds']} s\n"
            f"report: {out['report']}\nresults: {out['results']} (try: sae-transfer sql \"select * from metrics\" --results {out['results']})")
