"""The DAG's Dask runner (flows/_dask.py) on real Dask clusters of this host, CPU only: heavy steps
carry a GPU resource restriction to the scheduler (a cluster started here, and one reached by
address: prefect-dask#47), Dask priority annotations survive Prefect's submit (prefect#21608),
task-result records live on the object store so every worker sees every cache hit
(prefect-ray#26, prefect#15783), and a bad cluster is one line."""

from __future__ import annotations

import dask
import pytest
from prefect import flow, task

from sae_transfer.errors import UserError
from sae_transfer.flows import _dask, _runs
from sae_transfer.study import parse_study


@task(name="heavy")
def heavy(x: int) -> int:
    return x * x


@task(name="bookkeeping", tags=["always-runs"])
def bookkeeping(x: int) -> int:
    return x + 1


def _scheduler_tasks(dask_scheduler):
    """Every task the scheduler holds: key -> (resource restriction, user priority)."""
    return {str(k): (dict(ts.resource_restrictions or {}), ts.priority[0]) for k, ts in dask_scheduler.tasks.items()}


@flow
def two_kinds():
    from prefect.context import get_run_context

    futures = {"heavy": heavy.submit(3), "bookkeeping": bookkeeping.submit(3)}
    with dask.annotate(priority=5):
        futures["annotated"] = heavy.submit(4)
    values = {name: f.result() for name, f in futures.items()}
    held = get_run_context().task_runner.client.run_on_scheduler(_scheduler_tasks)  # futures still held: tasks kept
    keys = {name: f.wrapped_future.key for name, f in futures.items()}
    return values, {name: held[str(key)] for name, key in keys.items()}


def _check_restrictions(values, held):
    assert values == {"heavy": 9, "bookkeeping": 4, "annotated": 16}
    assert held["heavy"][0] == {"GPU": 1}  # the heavy step reached the scheduler with its GPU request
    assert held["bookkeeping"][0] == {}  # bookkeeping needs no device
    assert held["annotated"] == ({"GPU": 1}, -5)  # Dask priorities: higher runs first, stored negated


def test_heavy_steps_ask_a_local_cluster_for_a_gpu(prefect_harness):
    runner = _dask.dask_runner(2, [], None, "GPU")
    _check_restrictions(*two_kinds.with_options(task_runner=runner)())


def test_heavy_steps_ask_an_existing_cluster_for_a_gpu(prefect_harness):
    with _dask.local_cluster(2, [], "GPU") as cluster:
        cfg = parse_study({"runner": {"kind": "dask", "address": cluster.scheduler_address}})
        assert _dask.check_cluster(cluster.scheduler_address, "GPU", api_configured=True)
        _check_restrictions(*two_kinds.with_options(task_runner=_runs.task_runner(cfg.runner))())


def test_unreachable_scheduler_is_one_line(monkeypatch):
    monkeypatch.setattr(_dask, "CONNECT_TIMEOUT_S", 1)
    with pytest.raises(UserError, match=r"no Dask scheduler answers at 'tcp://127.0.0.1:9'.*runner.address"):
        _dask.check_cluster("tcp://127.0.0.1:9", "GPU", api_configured=True)


def test_cluster_without_the_gpu_resource_is_one_line():
    with _dask.local_cluster(1, [], None) as cluster:
        with pytest.raises(UserError, match=r"offers the resource 'GPU'.*--resources GPU=1"):
            _dask.check_cluster(cluster.scheduler_address, "GPU", api_configured=True)
        assert _dask.check_cluster(cluster.scheduler_address, None, api_configured=True)  # none asked: fine


def test_remote_scheduler_needs_a_reachable_prefect_server():
    with pytest.raises(UserError, match="PREFECT_API_URL"):
        _dask.check_cluster("tcp://10.1.2.3:8786", "GPU", api_configured=False)


def test_runner_section_checks_its_fields():
    from sae_transfer.study import parse_study

    assert isinstance(_runs.task_runner(parse_study({}).runner), type(_runs.worker_pool()))
    with pytest.raises(UserError, match="kind: dask"):
        parse_study({"runner": {"address": "tcp://h:8786"}})


@task(name="square-cached", persist_result=True, result_serializer="json",
      cache_key_fn=lambda context, parameters: f"square-{parameters['x']}-{parameters['salt']}")
def square_cached(x: int, salt: str) -> dict:
    import os

    return {"square": x * x, "pid": os.getpid()}


@flow
def squares(salt: str):
    futures = [square_cached.submit(x, salt) for x in range(3)]
    return [(f.result()["square"], f.state.name) for f in futures]


def test_task_records_on_the_store_serve_every_worker(prefect_harness, s3_store, monkeypatch, tmp_path):
    import fsspec

    s3_store.env(monkeypatch)
    root = s3_store.url("results")
    cfg = parse_study({"results_root": root, "runner": {"kind": "dask", "workers": 2}})
    options = _runs.flow_options(cfg)
    assert options["result_storage"].basepath == f"{root}/.prefect-results"
    salt = root.rsplit("/", 2)[-2]  # a fresh cache key per test run
    first = squares.with_options(**options)(salt)
    assert first == [(0, "Completed"), (1, "Completed"), (4, "Completed")]
    fs, path = fsspec.core.url_to_fs(f"{root}/.prefect-results")
    assert {f"square-{x}-{salt}" for x in range(3)} <= {p.rsplit("/", 1)[-1] for p in fs.ls(path, refresh=True)}
    again = squares.with_options(**_runs.flow_options(cfg))(salt)  # a fresh cluster: hits come from the store
    assert again == [(0, "Cached"), (1, "Cached"), (4, "Cached")]
    local = parse_study({"results_root": str(tmp_path)})
    assert "result_storage" not in _runs.flow_options(local)  # local results: Prefect's local storage, as before


def test_runner_option_overrides_the_config():
    from sae_transfer.cli.study_cmd import _with_runner

    cfg = parse_study({"runner": {"workers": 4}})
    assert _with_runner(cfg, None, None) is cfg
    on_cluster = _with_runner(cfg, "tcp://gpu-host:8786", None).runner
    assert (on_cluster.kind, on_cluster.address, on_cluster.workers) == ("dask", "tcp://gpu-host:8786", 4)
    local = _with_runner(_with_runner(cfg, "tcp://gpu-host:8786", None), "dask", 2).runner
    assert (local.kind, local.address, local.workers) == ("dask", None, 2)
    with pytest.raises(UserError, match="--runner 'ray'"):
        _with_runner(cfg, "ray", None)


def test_every_heavy_step_asks_for_the_gpu_and_bookkeeping_does_not():
    from sae_transfer.tasks import activations, diffing, evaluate, report, sae
    from sae_transfer.tasks import checkpoints as ckpt_tasks

    runner = _dask.StudyDaskRunner(gpu_resource="GPU")
    heavy_steps = [activations.cache_activations, sae.train_sae, sae.train_saes_live, sae.finetune_sae,
                   sae.finetune_saes_live, evaluate.evaluate_transfer, evaluate.tag_outliers, evaluate.make_rollouts,
                   diffing.train_crosscoder, diffing.checkpoint_drift]
    assert all(runner.resources_of(t) == {"GPU": 1} for t in heavy_steps)  # every train-sae of a sweep too
    for t in (report.build_report, report.record_run, ckpt_tasks.record_checkpoint, ckpt_tasks.publish_watch):
        assert runner.resources_of(t) is None, t.name
    assert _dask.StudyDaskRunner(gpu_resource=None).resources_of(sae.train_sae) is None
    assert runner.duplicate() == runner and runner.duplicate().gpu_resource == "GPU"


def _worker_environment():
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("PREFECT_API_URL"), os.environ.get("OMP_NUM_THREADS")


def test_each_local_worker_gets_its_own_gpu_and_the_flows_api(monkeypatch):
    from distributed import Client

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4999/api")  # the server shared_api started
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # a user's own setting would be kept
    with _dask.local_cluster(2, ["3", "5"], "GPU") as cluster, Client(cluster) as client:
        seen = sorted(client.run(_worker_environment).values())
        offered = [info["resources"] for info in client.scheduler_info()["workers"].values()]
    assert seen == [("3", "http://127.0.0.1:4999/api", "4"), ("5", "http://127.0.0.1:4999/api", "4")]
    assert offered == [{"GPU": 1}, {"GPU": 1}]


@task(name="dies-once")
def dies_once(mark: str) -> int:
    """Kills its own worker process the first time it runs (as a lost host would), then succeeds."""
    import os
    from pathlib import Path

    if not Path(mark).exists():
        Path(mark).write_text(str(os.getpid()))
        os.kill(os.getpid(), 9)
    return os.getpid()


@flow
def survives_a_lost_worker(mark: str):
    future = dies_once.submit(mark)
    return future.result(), future.state.name


def test_a_worker_lost_mid_task_is_replaced_by_another(prefect_harness, tmp_path):
    mark = tmp_path / "first-attempt"
    pid, state = survives_a_lost_worker.with_options(task_runner=_dask.dask_runner(2, [], None, "GPU"))(str(mark))
    assert state == "Completed"
    assert str(pid) != mark.read_text()  # Dask re-ran the task on the surviving worker, no loop of ours
