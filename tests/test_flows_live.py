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


def test_a_sweep_over_two_hooks_trains_every_sae_of_a_model_from_one_stream(tmp_path, prefect_harness):
    """`sae.sweep` x every hook: one training stream per model, one fine-tuning stream; every SAE
    in the transfer matrix with its variant; the diffing stage compares the first variant's SAEs."""
    from sae_transfer.flows.study import transfer_study

    cfg = tiny_study(tmp_path, name="sweep")
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    cfg = cfg.model_copy(update={
        "hooks": hooks,
        "sae": cfg.sae.model_copy(update={"source": "live", "buffer_tokens": 2048, "arch": "topk",
                                          "sweep": {"k": [4, 8]}}),
        "diffing": cfg.diffing.model_copy(update={"tokens": 2048, "checkpoint_finetune_tokens": 0, "crosscoder": False,
                                                  "causal": False}),
        "instructions": cfg.instructions.model_copy(update={"enabled": False}),
        "pair": cfg.pair.model_copy(update={"checkpoints": None}),
    })
    transfer_study(cfg)
    runs = [json.loads(p.read_text()) for p in Path(cfg.results_dir, "saes").rglob("run.json")]
    assert len(runs) == 12  # (base, chat, fine-tuned) x 2 hooks x 2 variants
    # each stream trained the 4 SAEs of one model (2 hooks x 2 variants) in one pass
    assert {r["timings"]["group_size"] for r in runs} == {4}
    assert {r["metadata"]["variant"] for r in runs if r.get("metadata")} == {"k=4", "k=8"}
    rows = catalog.query(cfg.results_dir, "select hook, sae_variant, count(*) as n from metrics where segment = 'text' "
                                          "group by all order by all")
    assert rows["n"].tolist() == [12] * 4  # per (hook, variant): 3 SAEs x 2 models x 2 outlier policies
    assert set(rows["sae_variant"]) == {"k=4", "k=8"} and set(rows["hook"]) == set(hooks)
    l0 = catalog.query(cfg.results_dir, "select sae_variant, avg(l0) as l0 from metrics where segment = 'text' "
                                        "and sae_finetuned_from is null group by all order by all")
    assert l0["l0"].iloc[0] <= 4.01 and 4.01 < l0["l0"].iloc[1] <= 8.01  # k=4 SAEs fire 4 latents, k=8 ones 8
    diffed = set(catalog.query(cfg.results_dir, "select distinct dictionary from latent_stats")["dictionary"])
    ids = catalog.query(cfg.results_dir, "select distinct sae_id, sae_variant from metrics")
    first = {s.split(":")[0] for s in ids[ids["sae_variant"] == "k=4"]["sae_id"]}
    assert diffed and {d.split(":")[0] for d in diffed} <= first, (diffed, first)
