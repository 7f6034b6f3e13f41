"""The worker pool of the DAG: how many workers, their threads, one GPU each on a multi-GPU host."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from sae_transfer.flows import _runs


@pytest.fixture
def worker(monkeypatch):
    """Pretend to be the n-th worker process a pool started (1-based, as multiprocessing counts)."""

    def become(n: int):
        monkeypatch.setattr(multiprocessing.current_process(), "_identity", (n,))
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    return become


def test_each_worker_gets_its_share_of_the_cores(worker, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    worker(1)
    _runs._init_worker(4, [])
    assert os.environ["OMP_NUM_THREADS"] == "4"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # no GPUs: nothing pinned


def test_each_worker_gets_its_own_gpu(worker):
    seen = []
    for n in (1, 2, 3):
        worker(n)
        _runs._init_worker(2, ["3", "5"])
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["3", "5", "3"]  # round robin over the visible GPUs, in start order


def test_one_gpu_is_left_as_it_is(worker):
    worker(2)
    _runs._init_worker(2, ["0"])
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_worker_count(monkeypatch):
    monkeypatch.setattr(_runs, "_visible_gpus", lambda: [])
    assert _runs.worker_pool()._max_workers == _runs.DEFAULT_CPU_WORKERS
    assert _runs.worker_pool(3)._max_workers == 3
    monkeypatch.setattr(_runs, "_visible_gpus", lambda: ["0", "1", "2", "3"])
    pool = _runs.worker_pool()
    assert pool._max_workers == 4 and pool._initargs == (4, ["0", "1", "2", "3"])


def test_study_config_names_the_worker_count():
    from sae_transfer.study import parse_study

    assert parse_study({"runner": {"workers": 3}}).runner.workers == 3
    with pytest.raises(Exception, match="runner.workers"):
        parse_study({"runner": {"workers": 0}})
