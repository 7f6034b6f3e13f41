"""On a Dask runner the study splits each model's cache by sequence range over the workers (one
range task each, then the merge); on the single-machine runner it stays one task."""

from __future__ import annotations

from sae_transfer.flows import saes as saes_mod
from tests._tiny_study import tiny_study


class _Task:
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def submit(self, *args, **kwargs):
        self.calls.append((self.name, args, kwargs))
        return f"{self.name}-future-{len(self.calls)}"


def _wired(monkeypatch, ranges):
    calls: list = []
    for name in ("cache_activations", "cache_activation_range", "merge_activation_ranges"):
        monkeypatch.setattr(saes_mod, name, _Task(name, calls))
    asked = []
    monkeypatch.setattr(saes_mod, "activation_ranges", lambda *a, **k: asked.append((a, k)) or ranges)
    return calls, asked


def test_a_dask_runner_splits_each_cache_over_its_workers(tmp_path, monkeypatch):
    calls, asked = _wired(monkeypatch, [(0, 40), (40, 80), (80, 96)])
    cfg = tiny_study(tmp_path)
    cfg = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"kind": "dask", "workers": 3})})
    future = saes_mod.cache_model(cfg, "base-model", None, cfg.corpus)
    assert asked[0][0][5] == 3  # as many ranges as workers, at most
    ranges = [c for c in calls if c[0] == "cache_activation_range"]
    assert [c[1][6:8] for c in ranges] == [(0, 40), (40, 80), (80, 96)]
    merge = calls[-1]
    assert merge[0] == "merge_activation_ranges" and merge[2]["ranges"] == ["cache_activation_range-future-1",
                                                                          "cache_activation_range-future-2",
                                                                          "cache_activation_range-future-3"]
    assert future == "merge_activation_ranges-future-4"


def test_one_range_or_the_process_runner_keeps_one_cache_task(tmp_path, monkeypatch):
    calls, asked = _wired(monkeypatch, [(0, 96)])
    cfg = tiny_study(tmp_path)
    dask = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"kind": "dask", "workers": 2})})
    saes_mod.cache_model(dask, "base-model", None, cfg.corpus)  # too small to split
    saes_mod.cache_model(cfg, "base-model", None, cfg.corpus)  # worker processes of one machine: never split
    assert [c[0] for c in calls] == ["cache_activations", "cache_activations"] and len(asked) == 1
