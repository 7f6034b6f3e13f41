"""The checkpoint flows leave Prefect artifacts, and a Hub checkpoint found by the watcher
(`repo@commit`, listed by a local stand-in for the Hub) loads and is recorded under one id."""

from __future__ import annotations

import json

import pytest

from sae_transfer.sae.io import save_sae
from sae_transfer.storage import catalog
from sae_transfer.storage.tables import read_table
from tests._hub import fake_hub_cache, fake_refs
from tests._tiny import tiny_corpus_dir, tiny_model_dir
from tests.test_evals_metrics import lossless_sae

pytestmark = pytest.mark.slow

HOOK = "blocks.1.hook_resid_pre"
REPO = "org/tiny-chat"


@pytest.fixture(scope="module")
def watched(tmp_path_factory, prefect_harness):
    """A study with one SAE, a local checkpoint folder (step-10) and a Hub repo whose branch
    step-50 and tag v50 are one commit; the watcher run twice."""
    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    from sae_transfer.flows.watch import watch_checkpoints
    from sae_transfer.study import parse_study
    from sae_transfer.tasks.records import SAERecord

    root = tmp_path_factory.mktemp("watch")
    model = tiny_model_dir(root, name="chat", seed=0)
    tiny_model_dir(root / "ckpts", name="step-10", seed=1)
    commits = fake_hub_cache(root / "cache", REPO, {"step-50": tiny_model_dir(root, name="hub50", seed=2)})
    cfg = parse_study({
        "name": "watch", "results_root": str(root / "results"), "hooks": [HOOK], "device": "cpu",
        "pair": {"base": str(model), "chat": str(model), "checkpoints": str(root / "ckpts"), "checkpoints_repo": REPO,
                 "build_demo": False},
        "corpus": {"source": str(tiny_corpus_dir(root)), "context_size": 32},
        "eval": {"tokens": 128, "bootstrap": 10}, "outliers": {"threshold": 1e9},
    })
    sae = save_sae(lossless_sae(32), root / "sae", metadata={"model_name": str(model), "hook_name": HOOK, "context_size": 32})
    saes = {HOOK: [SAERecord(path=str(sae), run_dir=str(sae), model=str(model), hook=HOOK, role="base")]}
    thresholds = {HOOK: {"threshold": 1e9, "source": "config"}}
    listing = fake_refs({"step-50": commits["step-50"]}, tags={"v50": commits["step-50"]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub_constants, "HF_HUB_CACHE", str(root / "cache"))
        mp.setenv("HF_HUB_CACHE", str(root / "cache"))  # the worker processes that evaluate read it at start-up
        mp.setattr(huggingface_hub, "list_repo_refs", lambda repo: listing)
        first = watch_checkpoints(cfg, build=False, saes=saes, thresholds=thresholds)
        second = watch_checkpoints(cfg, build=False, saes=saes, thresholds=thresholds)
    return cfg, commits, first, second, root


def _artifacts(key: str):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                     sort=ArtifactSort.CREATED_DESC)


def test_hub_checkpoint_is_evaluated_once_under_one_id(watched):
    cfg, commits, first, second, root = watched
    hub_spec = f"{REPO}@{commits['step-50']}"
    assert first["evaluated"] == [str(root / "ckpts" / "step-10"), hub_spec]  # the tag is the same commit
    assert second["evaluated"] == []
    rows = read_table(cfg.results_dir, "checkpoints").to_pylist()
    by_status = {(r["path"], r["status"]): r["checkpoint_id"] for r in rows}
    for path in first["evaluated"]:
        assert by_status[(path, "seen")] == by_status[(path, "evaluated")]  # watcher and evaluation agree
    assert by_status[(hub_spec, "seen")] == hub_spec
    metrics = catalog.query(cfg.results_dir, "select model_id, model_revision, ce_loss_score from metrics")
    hub_rows = metrics[metrics.model_revision == "step-50"]
    assert set(hub_rows.model_id) == {hub_spec} and len(hub_rows) == 2  # 1 SAE x 2 outlier policies
    assert hub_rows.ce_loss_score.tolist() == pytest.approx([1.0, 1.0], abs=1e-3)  # lossless SAE on the Hub checkpoint


def test_evaluation_publishes_the_drift_table(watched):
    cfg, *_ = watched
    latest = _artifacts("watch-checkpoint-drift")
    assert len(latest) == 2  # one version per evaluated checkpoint
    table = json.loads(latest[0].data) if isinstance(latest[0].data, str) else latest[0].data
    steps = {(r["step"], r["new"]) for r in table}
    assert steps == {(10, False), (50, True)}  # the new checkpoint beside the drift so far
    assert [r["ce_loss_score"] for r in table] == pytest.approx([1.0] * len(table), abs=1e-3)


def test_every_watch_run_publishes_what_was_new(watched):
    runs = _artifacts("watch-checkpoint-watch")
    assert len(runs) == 2
    newest, oldest = runs[0].data, runs[1].data
    assert "3 checkpoints found, 2 new" in oldest and "step 50" in oldest
    assert "nothing new" in newest
