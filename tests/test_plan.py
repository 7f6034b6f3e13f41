"""`sae-transfer plan`: the cost of a study before it runs, and the disk check before a cache is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from transformers import MistralConfig
from typer.testing import CliRunner

from sae_transfer import plan as plan_mod
from sae_transfer.cli import app
from sae_transfer.errors import UserError
from sae_transfer.model_shapes import study_shapes
from sae_transfer.plan import ROW_OVERHEAD_BYTES, plan_study
from sae_transfer.storage.layout import StudyLayout
from sae_transfer.study import example_config, load_study, parse_study
from sae_transfer.tasks import activations as cache_task
from tests._tiny import tiny_corpus_dir, tiny_model_dir

HOOK = "blocks.1.hook_resid_pre"
TOKENS = 4000
RATE = 1e10  # FLOP/s: no timed matmul in tests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    model = tiny_model_dir(root, d_model=32, n_layers=2)
    corpus = tiny_corpus_dir(root, n_copies=2)
    data = {"name": "tiny", "results_root": str(root / "results"),
            "pair": {"base": str(model), "chat": str(model), "checkpoints": None, "build_demo": False},
            "hooks": [HOOK], "corpus": {"source": str(corpus), "context_size": 40, "train_tokens": TOKENS},
            "sae": {"expansion": 4, "batch_size": 256, "train_tokens": 8000}, "diffing": {"enabled": False}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, parse_study(data)


def _cache_steps(plan):
    return [s for s in plan.steps if s.step == "cache-activations"]


def _run_task(cfg, out_dir):
    return cache_task.cache_activations.fn(cfg.pair.base, cfg.hooks, cfg.corpus, cfg.loading, cfg.act_dtype, str(out_dir))


def test_planned_cache_bytes_match_what_the_writer_writes(tiny, monkeypatch):
    _, cfg = tiny
    before = plan_study(cfg, rate=RATE, device="cpu")
    planned = _cache_steps(before)[0]
    assert planned.cached is False and planned.tokens == TOKENS
    out = StudyLayout(cfg.results_dir).activations
    monkeypatch.setattr(cache_task, "get_run_logger", lambda: logging.getLogger("test"))
    [record] = _run_task(cfg, out)
    written = sum(f.stat().st_size for f in Path(record.path).rglob("*") if f.is_file())
    assert written / 2 <= planned.disk_bytes <= written * 2, (planned.disk_bytes, written)
    assert planned.disk_bytes == TOKENS * (32 * 4 + ROW_OVERHEAD_BYTES)
    # the finished dataset is found by the next plan (both roles use the same local model here)
    assert all(s.cached for s in _cache_steps(plan_study(cfg, rate=RATE, device="cpu")))


def test_cache_refused_in_one_line_when_the_disk_is_too_small(tiny, tmp_path, monkeypatch):
    _, cfg = tiny
    monkeypatch.setattr(plan_mod, "free_bytes", lambda folder: 1000)
    out = tmp_path / "acts"
    with pytest.raises(UserError) as err:
        _run_task(cfg, out)
    message = str(err.value)
    assert "\n" not in message and str(out) in message and "1000 B" in message
    assert f"{TOKENS * (32 * 4 + ROW_OVERHEAD_BYTES)} B" in message and "corpus.train_tokens" in message
    assert not out.exists()  # nothing written


def test_cache_proceeds_when_the_disk_has_room(tiny, tmp_path, monkeypatch):
    _, cfg = tiny
    monkeypatch.setattr(plan_mod, "free_bytes", lambda folder: 10**12)
    monkeypatch.setattr(cache_task, "get_run_logger", lambda: logging.getLogger("test"))
    [record] = _run_task(cfg, tmp_path / "acts")
    assert record.n_tokens == TOKENS and not record.reused


# Mistral-7B's shape, as its config.json gives it (no download: the plan reads only the config)
MISTRAL = MistralConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=14336,
                        num_attention_heads=32, num_key_value_heads=8)


def test_mistral_cache_is_800m_tokens_x_4096_x_2_bytes_per_model():
    cfg = load_study(example_config("mistral-7b"))
    cfg = cfg.model_copy(update={"sae": cfg.sae.model_copy(update={"source": "cache"})})  # the cache, asked for
    result = plan_study(cfg, gpu="h100", shapes={"base": MISTRAL, "chat": MISTRAL}, rate=RATE, device="cpu")
    assert 7.0e9 < result.shapes["base"].n_params < 7.5e9
    caches = _cache_steps(result)
    assert [s.target for s in caches] == ["base", "chat"]
    for step in caches:  # the activations column is exactly 800M x 4096 x 2 B; bookkeeping columns add 8 B a row
        assert step.disk_bytes - 800_000_000 * ROW_OVERHEAD_BYTES == 800_000_000 * 4096 * 2
    totals = result.totals()
    assert totals["cache_disk_bytes"] == 2 * caches[0].disk_bytes
    assert totals["total_disk_bytes"] > 13e12 and totals["total_gpu_seconds"] > 3600
    transfer = next(s for s in result.steps if s.step == "transfer")
    assert transfer.device_bytes > 4096 * 32000 * 12  # eval batch's logits held 3x in float32


def test_auto_source_trains_live_when_the_caches_do_not_fit(monkeypatch):
    cfg = load_study(example_config("mistral-7b"))
    assert cfg.sae.source == "auto"
    shapes = {"base": MISTRAL, "chat": MISTRAL}
    monkeypatch.setattr(plan_mod, "free_bytes", lambda folder: 20 * 10**12)  # 20 TB: 2 x 6.6 TB fit in 80 %
    assert plan_mod.training_source(cfg, study_shapes(cfg, shapes)) == "cache"
    monkeypatch.setattr(plan_mod, "free_bytes", lambda folder: 2 * 10**12)  # a 2 TB disk
    assert plan_mod.training_source(cfg, study_shapes(cfg, shapes)) == "live"
    result = plan_study(cfg, gpu="h100", shapes=shapes, rate=RATE, device="cpu")
    assert result.totals()["total_disk_bytes"] < 10**12  # no 6.6 TB caches: only the diffing share is cached
    train = [s for s in result.steps if s.step == "train-sae"]
    assert train and all(s.model_tokens == s.tokens == 800_000_000 for s in train)


def test_plan_cli_json_and_table(tiny, monkeypatch):
    path, _ = tiny
    monkeypatch.setattr(plan_mod, "measured_rate", lambda device: RATE)
    runner = CliRunner()
    out = runner.invoke(app, ["plan", str(path), "--format", "json", "--gpu", "a100"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["total_disk_bytes"] == sum(s["disk_bytes"] for s in data["steps"])
    assert {s["step"] for s in data["steps"]} >= {"cache-activations", "train-sae", "finetune-sae", "transfer", "rollouts"}
    assert data["gpu"] == "a100" and data["models"]["base"]["d_model"] == 32
    table = runner.invoke(app, ["plan", str(path)])
    assert table.exit_code == 0, table.output
    assert "cache-activations" in table.output and "total: disk" in table.output and "time on GPU" in table.output


def test_unknown_gpu_is_one_line(tiny):
    _, cfg = tiny
    with pytest.raises(UserError, match="h100"):
        plan_study(cfg, gpu="v100", rate=RATE)


def test_live_sweep_plans_one_forward_stream_per_model(monkeypatch):
    """Every hook and sweep value of a model trains from one stream: the plan charges its forward
    passes (and its token file) once per model, not once per SAE."""
    cfg = load_study(example_config("mistral-7b"))
    cfg = cfg.model_copy(update={"hooks": ["blocks.8.hook_resid_pre", "blocks.16.hook_resid_pre"],
                                 "sae": cfg.sae.model_copy(update={"source": "live", "sweep": {"l1_coefficient": [2, 5, 12]}})})
    result = plan_study(cfg, gpu="h100", shapes={"base": MISTRAL, "chat": MISTRAL}, rate=RATE, device="cpu")
    train = [s for s in result.steps if s.step == "train-sae"]
    assert len(train) == 2 * 2 * 3  # models x hooks x variants
    streams = [s for s in train if s.model_tokens]
    assert len(streams) == 2 and all(s.model_tokens == 800_000_000 for s in streams)
    assert "6 SAE(s)" in streams[0].note and "blocks.16" in streams[0].note
    assert {s.target.split()[0] for s in streams} == {"base", "chat"}
