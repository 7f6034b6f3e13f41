"""transfer_study: the whole DAG for one study config.

pair -> caches (base, chat) -> SAEs (base, chat) -> fine-tuned base SAE -> transfer matrix,
outliers, segments, position curves, weight diffs, feature diffing, new fine-tuning checkpoints
-> report. Every hook's (and checkpoint's) work is submitted before the flow waits on any of it; the heavy steps run in worker
processes (`_runs.worker_pool`), each step receives the records it depends on.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import wait

from sae_transfer.flows._runs import current_run_id, flow_options, shared_api, step_timings, worker_pool
from sae_transfer.flows.checkpoints import finish_checkpoint, submit_checkpoint
from sae_transfer.flows.saes import StudySAEs, cache_pair, run_dir, submit_saes
from sae_transfer.flows.watch import new_checkpoints
from sae_transfer.storage.layout import StudyLayout
from sae_transfer.study import StudyConfig
from sae_transfer.tasks._cache import code_version
from sae_transfer.tasks.checkpoints import publish_watch
from sae_transfer.tasks.diffing import activation_diff, causal_check, diff_crosscoder, diff_saes, train_crosscoder
from sae_transfer.tasks.evaluate import (
    evaluate_segments,
    evaluate_transfer,
    make_rollouts,
    position_curves,
    tag_outliers,
    weight_diff,
)
from sae_transfer.tasks.models import prepare_pair
from sae_transfer.tasks.report import build_report, record_run


def _diffing(config: StudyConfig, study: StudySAEs, pair, made) -> list:
    """Submit the diffing stage of every hook: SAE latents, the crosscoder, the causal check. On a
    separate diffing corpus, or when the SAEs trained live (no study caches), both models are
    cached first on `diffing.tokens` tokens of it."""
    d, results, layout = config.diffing, str(config.results_dir), StudyLayout(config.results_dir)
    acts = study.acts
    if d.corpus or acts is None:  # its own corpus, or its share of the study corpus when the SAEs trained live
        corpus = config.corpus.model_copy(update={"source": d.corpus or config.corpus.source, "train_tokens": d.tokens})
        acts = {role: {a.hook: a for a in fut.result()} for role, fut in cache_pair(config, pair, corpus).items()}
    out = []
    for hook in config.hooks:
        base, chat = acts["base"][hook], acts["chat"][hook]
        diff = diff_saes.submit(study.primary(hook), base, chat, d, config.device, results)
        out.append(diff)
        if d.activation_diff:
            out.append(activation_diff.submit(study.of(hook), base, chat, d.stats_tokens, config.device, results))
        if d.crosscoder:
            plan = config.crosscoder_plan
            cc_dir = run_dir(layout, "crosscoder", hook, base.path, chat.path, plan.model_dump(),
                             code_version("sae_transfer.diffing"))
            crosscoder = train_crosscoder.submit(base, chat, plan, config.device, cc_dir)
            out.append(diff_crosscoder.submit(crosscoder, base, chat, d, config.device, results))
        if d.causal and made is not None:
            out.append(causal_check.submit(study.primary(hook), pair.chat, hook, diff, made, config.loading, results))
    return out


def _evaluations(config: StudyConfig, study: StudySAEs, pair, made) -> list:
    """Submit every evaluation of every hook: transfer matrix, outliers, positions, segments."""
    settings, results = config.eval_settings, str(config.results_dir)
    pending = []
    for hook in config.hooks:
        saes, thr = study.of(hook), study.thresholds[hook]
        for model in (pair.base, pair.chat):
            pending.append(tag_outliers.submit(model, hook, settings, results, threshold=thr))
            pending.append(evaluate_transfer.submit(saes, model, hook, settings, results, threshold=thr))
            pending.append(position_curves.submit(saes, model, hook, settings, results, threshold=thr))
        if made is not None:
            base_chat = study.primary(hook)[:2]
            pending.append(evaluate_segments.submit(base_chat, pair.chat, hook, settings, made, results, threshold=thr))
    return pending


@flow(name="transfer_study", log_prints=True, task_runner=worker_pool())
def transfer_study(config: StudyConfig) -> dict:
    """Run (or re-use) every step of the study and build the report; returns where it is."""
    started = time.perf_counter()
    progress = create_progress_artifact(0.0, description=f"study {config.name}: caching activations")
    results = str(config.results_dir)
    pair = prepare_pair(config.pair)
    study = submit_saes(config, pair)
    update_progress_artifact(progress, 20.0, description=f"study {config.name}: training and evaluating")
    made = (make_rollouts.submit(pair.chat, config.instructions, config.loading, results)
            if config.instructions.enabled else None)
    pending = [weight_diff.submit(pair.base, pair.chat, results), *_evaluations(config, study, pair, made)]
    if config.diffing.enabled:
        pending += _diffing(config, study, pair, made)
    found, new = new_checkpoints(config) if pair.checkpoints or config.pair.checkpoints_repo else ([], [])
    saes = {hook: study.of(hook) for hook in config.hooks}
    checkpoints = [(c, submit_checkpoint(config, c.path, c.step, saes, study.thresholds)) for c in new]
    wait(pending)
    for fut in pending:
        fut.result()  # surface the first failure
    update_progress_artifact(progress, 80.0, description=f"study {config.name}: checkpoints and report")
    for ckpt, futures in checkpoints:
        finish_checkpoint(config, ckpt.path, ckpt.step, futures)
    if found:
        publish_watch(config, found, new, "inline")
    report = build_report(config)
    update_progress_artifact(progress, 100.0, description=f"study {config.name}: done")
    timings = step_timings()
    steps = [cached for _, cached in timings.values() if cached is not None]
    timings["total"] = (time.perf_counter() - started, all(steps))
    record_run(config, "transfer_study", current_run_id(), timings)
    return {"report": report, "results": results, "seconds": round(time.perf_counter() - started, 1),
            "steps": len(steps), "cached_steps": sum(steps), "checkpoints": [c.path for c in new]}


@flow(name="study_on_runner", log_prints=True)
def study_on_runner(config: StudyConfig) -> dict:
    """`transfer_study` as a subflow on the task runner and result store `config.runner` names:
    the deployment entrypoint, since a flow's task runner is fixed before its parameters are read."""
    return transfer_study.with_options(**flow_options(config))(config)


def run_study(config: StudyConfig) -> str:
    """Run `transfer_study` from this process (its own Prefect API unless a server is configured;
    worker processes or a Dask cluster, as `config.runner` says) and describe the outcome."""
    with shared_api():
        out = transfer_study.with_options(**flow_options(config))(config)
    return (f"study {config.name}: {out['steps']} steps ({out['cached_steps']} cached) in {out['seconds']} s\n"
            f"report: {out['report']}\nresults: {out['results']} "
            f"(try: sae-transfer sql \"select * from metrics\" --results {out['results']})")
