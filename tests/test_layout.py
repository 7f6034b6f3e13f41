"""One owner for the SAE run-folder layout: what the trainer writes is where every reader looks
(fine-tuning's parent config, the evaluator's SAE name, the task record, the catalog view)."""

from __future__ import annotations

import json

import torch

from sae_transfer.storage.layout import RunLayout, StudyLayout
from sae_transfer.training import TrainConfig
from sae_transfer.training.run import train_sae
from sae_transfer.training.sources import in_memory_factory

HOOK = "blocks.0.hook_resid_pre"


def test_every_reader_finds_what_the_trainer_wrote(tmp_path):
    from sae_transfer.evals.loading import load_saes
    from sae_transfer.storage import catalog
    from sae_transfer.training.api import parent_config

    study = StudyLayout(tmp_path)
    acts = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(arch="relu", d_sae=16, total_tokens=256 * 4, batch_size=256, l1_coefficient=0.3,
                      log_every_steps=1, scale_estimate_tokens=512)
    result = train_sae(cfg, in_memory_factory(acts, 256), 8, study.sae_run("run-a"), metadata={"hook_name": HOOK},
                       progress=False)
    run = RunLayout(study.sae_run("run-a"))
    assert result.sae_dir == run.sae and result.run_json == run.manifest
    assert (run.sae / "cfg.json").is_file() and any(run.checkpoints.iterdir()) and any(run.training_log.glob("*.parquet"))
    assert json.loads(run.manifest.read_text())["sae_dir"] == run.sae.name
    assert RunLayout.holding(result.sae_dir) == run and RunLayout.holding(tmp_path / "elsewhere") is None
    assert parent_config(run.sae) == cfg  # the parent's recorded config, not the defaults
    assert parent_config(tmp_path / "elsewhere") == TrainConfig()
    assert load_saes([str(run.sae)], HOOK)[0].info["sae_id"].startswith("run-a:")
    logged = catalog.query(tmp_path, "select sae_id, count(*) as n from training_log group by sae_id")
    assert logged["sae_id"].tolist() == ["run-a"] and int(logged["n"].iloc[0]) == 4
