"""The research DAG end to end on a tiny pair: tables filled, cached re-runs do no work,
touching the chat model re-runs exactly what depends on it, the watcher never repeats."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_transfer.storage import catalog
from tests._tiny_study import tiny_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prefect_harness):
    """The study's first run (the slow part, done once), and a copy of its folder as it left it."""
    from sae_transfer.flows.study import transfer_study

    root = tmp_path_factory.mktemp("study")
    cfg = tiny_study(root)
    first = transfer_study(cfg)
    snapshot = tmp_path_factory.mktemp("snapshot") / "study"
    shutil.copytree(root, snapshot)
    return root, snapshot, cfg, first


@pytest.fixture
def study(first_run):
    """The study right after its first run. A test may change it (touch a model, add a
    checkpoint, append rows): the folder is put back afterwards, so no test sees another's
    changes and the order the tests run in does not matter."""
    root, snapshot, cfg, first = first_run
    yield cfg, first
    shutil.rmtree(root)
    shutil.copytree(snapshot, root)


def _count(cfg, sql):
    return int(catalog.query(cfg.results_dir, sql).iloc[0, 0])


def test_first_run_fills_every_table(study):
    cfg, first = study
    assert first["cached_steps"] < first["steps"]
    assert _count(cfg, "select count(distinct run_id) from runs") == 1  # the first run's tables, nobody else's
    # 3 SAEs x 2 models x 2 outlier policies on plain text
    assert _count(cfg, "select count(*) from metrics where segment = 'text' and model_revision not like 'step-%'") >= 12
    assert _count(cfg, "select count(distinct segment) from metrics where segment <> 'text'") == 3
    for table in ("outliers", "outlier_summary", "token_errors", "weight_diff", "positions", "rollouts", "training_log", "runs",
                  "latent_stats", "latent_matches", "latent_drift", "latent_examples", "crosscoder_latents", "latent_scaling",
                  "latent_ablation", "activation_diff"):
        assert _count(cfg, f"select count(*) from {table}") > 0, table
    assert _count(cfg, "select count(*) from checkpoints where status = 'evaluated'") >= 2
    # each checkpoint also briefly fine-tuned the base SAE: per-latent drift rows per step
    assert _count(cfg, "select count(distinct step) from latent_drift where step is not null") >= 2
    html = (cfg.results_dir / "report" / "report.html").read_text()
    assert html.count("<table") >= 6 and 'id="diffing"' in html


def test_unchanged_rerun_is_fully_cached(study):
    from sae_transfer.flows.study import transfer_study

    cfg, first = study
    rows_before = _count(cfg, "select count(*) from metrics")
    again = transfer_study(cfg)
    assert again["cached_steps"] == again["steps"]
    assert _count(cfg, "select count(*) from metrics") == rows_before
    assert again["checkpoints"] == []  # the watcher remembers what it evaluated


def test_touching_the_chat_model_reruns_only_its_dependents(study):
    from sae_transfer.flows.study import transfer_study

    cfg, _ = study
    weights = cfg.pair.chat + "/model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "mlp" in k)
    tensors[name] = tensors[name] + 1e-3 * torch.randn_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    out = transfer_study(cfg)
    timings = catalog.query(cfg.results_dir, "select step, cached from runs where run_id = (select run_id from runs "
                            "where step = 'total' order by created_at desc limit 1) and step <> 'total'")
    ran = set(timings[~timings.cached].step)
    cached = set(timings[timings.cached].step)
    assert any("train-sae-base" in s for s in cached) and any("train-sae-chat" in s for s in ran)
    assert any("finetune-sae" in s for s in ran)
    assert any(s.startswith("cache-activations") and "chat" in s for s in ran)
    assert any(s.startswith("cache-activations") and "base" in s for s in cached)
    assert any(s.startswith("tag-outliers") and "base" in s for s in cached), (ran, cached)
    assert out["cached_steps"] < out["steps"]


def test_watcher_evaluates_a_new_checkpoint_exactly_once(study):
    from sae_transfer.flows.watch import watch_checkpoints

    cfg, _ = study
    checkpoints = sorted(p for p in Path(cfg.pair.checkpoints).iterdir())
    new = checkpoints[0].parent / "step-999999"
    shutil.copytree(checkpoints[0], new)
    tensors = load_file(new / "model.safetensors")
    name = next(k for k in tensors if "mlp" in k)
    tensors[name] = tensors[name] * 1.01  # different content: a genuinely new checkpoint
    save_file(tensors, new / "model.safetensors", metadata={"format": "pt"})
    first = watch_checkpoints(cfg, build=False)
    assert first["evaluated"] == [str(new)]
    assert watch_checkpoints(cfg, build=False)["evaluated"] == []
    rows = _count(cfg, "select count(*) from metrics where model_revision = 'step-999999'")
    assert rows == 6  # 3 SAEs x 2 outlier policies, once


def _last_run_steps(cfg) -> tuple[set[str], set[str]]:
    """(steps that ran, steps served from the cache) of the newest study run, from its `runs` rows."""
    timings = catalog.query(cfg.results_dir, "select step, cached from runs_history where run_id = (select run_id from "
                            "runs_history where step = 'total' order by created_at desc limit 1) and step <> 'total' "
                            "and cached is not null")
    return set(timings[~timings.cached].step), set(timings[timings.cached].step)


HEAVY = ("cache-activations", "train-sae", "finetune-sae", "train-crosscoder", "pair-threshold", "tag-outliers",
         "evaluate-transfer", "position-curves", "rollouts", "evaluate-segments", "weight-diff")


def test_a_diffing_knob_reruns_no_caching_training_or_evaluation(study):
    from sae_transfer.flows.study import transfer_study

    cfg, _ = study
    changed = cfg.model_copy(update={"diffing": cfg.diffing.model_copy(update={"examples_k": 3})})
    transfer_study(changed)
    ran, cached = _last_run_steps(cfg)
    assert ran and all(s.startswith(("diff-saes", "diff-crosscoder", "causal-check")) for s in ran), ran
    assert {s.split("#")[0] for s in cached} >= {s for s in cached if s.startswith(HEAVY)}
    assert sum(s.startswith(HEAVY) for s in cached) >= 15, cached


def test_adding_a_hook_reruns_only_that_hooks_tasks(study):
    from sae_transfer.flows.study import transfer_study

    cfg, _ = study
    new_hook = "blocks.0.hook_resid_pre"
    out = transfer_study(cfg.model_copy(update={"hooks": [*cfg.hooks, new_hook]}))
    ran, cached = _last_run_steps(cfg)
    # both models are cached again in one pass each, which reuses the old hook's datasets untouched
    assert {s for s in ran if not s.startswith("cache-activations")} == {s for s in ran if new_hook in s}, ran
    assert len({s for s in ran if new_hook in s}) >= 15, ran
    assert all(new_hook not in s for s in cached) and any(cfg.hooks[0] in s for s in cached), cached
    assert out["steps"] == len(ran) + len(cached)
