"""The study with SAEs trained on live activations: no training caches on disk, the same tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_transfer.storage import catalog
from tests._tiny_study import tiny_study

pytestmark = pytest.mark.slow


def test_live_study_caches_only_the_diffing_share_and_fills_every_table(tmp_path, prefect_harness):
    from sae_transfer.flows.study import transfer_study

    cfg = tiny_study(tmp_path, name="live")
    cfg = cfg.model_copy(update={
        "sae": cfg.sae.model_copy(update={"source": "live", "buffer_tokens": 2048}),
        "diffing": cfg.diffing.model_copy(update={"tokens": 2048, "checkpoint_finetune_tokens": 0}),
        "pair": cfg.pair.model_copy(update={"checkpoints": None}),
    })
    out = transfer_study(cfg)
    assert out["cached_steps"] < out["steps"]
    # the only activation datasets are the diffing share (2048 tokens), never corpus.train_tokens (4096)
    manifests = [json.loads(p.read_text()) for p in Path(cfg.results_dir, "activations").rglob("_manifest.json")]
    assert manifests and {m["n_tokens"] for m in manifests} == {2048}, {m.get("n_tokens") for m in manifests}
    # every SAE of the study trained on live activations
    cfgs = [json.loads(p.read_text()) for p in Path(cfg.results_dir, "saes").rglob("sae/cfg.json")]
    sources = {c.get("metadata", c).get("activation_source") for c in cfgs}
    assert len(cfgs) == 3 and sources == {"live"}, sources
    count = lambda sql: int(catalog.query(cfg.results_dir, sql).iloc[0, 0])  # noqa: E731
    assert count("select count(*) from metrics where segment = 'text'") == 12  # 3 SAEs x 2 models x 2 policies
    for table in ("latent_stats", "crosscoder_latents", "latent_ablation", "positions", "outliers"):
        assert count(f"select count(*) from {table}") > 0, table
