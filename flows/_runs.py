"""Flow helpers: the task runner a study config names (worker processes, or a Dask cluster through
`_dask`), where Prefect keeps its task-result records, one Prefect API for the flow and its
workers, and per-step timings read back from that API."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.context import get_run_context
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner

from sae_transfer.flows._dask import ALWAYS_RUNS, check_cluster, dask_runner

RESULTS_DIR = ".prefect-results"  # task-result records under a results root that is a URL
DEFAULT_CPU_WORKERS = 2  # worker processes on a machine without CUDA GPUs (memory: one model each)


def _init_worker(workers: int, gpus: list[str]) -> None:
    """Runs once in each worker process before any task: its share of the CPU cores as torch
    threads and, on a multi-GPU host, its own GPU (CUDA_VISIBLE_DEVICES, so `cuda` is that GPU).
    Set through the environment, before torch is imported in the worker."""
    index = (multiprocessing.current_process()._identity or (1,))[-1] - 1  # 0, 1, ... in start order
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    if len(gpus) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]


def _visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def worker_pool(workers: int | None = None) -> ProcessPoolTaskRunner:
    """The task runner of the single-machine DAG: `workers` worker processes (default: Prefect's
    PREFECT_TASKS_RUNNER_PROCESS_POOL_MAX_WORKERS, else one per CUDA GPU, else 2), each with
    cores / workers torch threads and, with several GPUs, a GPU of its own."""
    gpus = _visible_gpus()
    workers = _worker_count(workers, gpus, pool_setting=True)
    return ProcessPoolTaskRunner(max_workers=workers, initializer=_init_worker, initargs=(workers, gpus))


def _worker_count(workers: int | None, gpus: list[str], pool_setting: bool) -> int:
    """`workers`, else (worker processes only) Prefect's pool setting, else one per GPU, else 2."""
    pool = get_current_settings().tasks.runner.process_pool_max_workers if pool_setting else None
    return workers or pool or len(gpus) or DEFAULT_CPU_WORKERS


def runner_workers(runner) -> int:
    """How many workers a study's runner section gives, by the rule `task_runner` starts them with;
    for a Dask scheduler at an address, what `workers` says it has."""
    return _worker_count(runner.workers, _visible_gpus(), pool_setting=runner.kind == "processes")


def task_runner(runner):
    """The task runner a study's `runner` section names (a RunnerSection): `worker_pool`, or a
    Dask runner on a LocalCluster of `runner.workers` (same default count) or at `runner.address`.
    A Dask address is checked first (call inside `shared_api`): one line naming what to fix."""
    if runner.kind == "processes":
        return worker_pool(runner.workers)
    if runner.address:
        check_cluster(runner.address, runner.gpu_resource, api_configured=_api_configured_by_user())
        return dask_runner(0, [], runner.address, runner.gpu_resource)
    gpus = _visible_gpus()
    return dask_runner(_worker_count(runner.workers, gpus, pool_setting=False), gpus, None, runner.gpu_resource)


def _is_url(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def task_records(config):
    """Where Prefect keeps the task-result records (cache hits) of `config`'s study: None (Prefect's
    local storage, as on one machine) unless `runner.result_storage` or a URL `results_root`
    names a store, then an fsspec `RemoteFileSystem` there, so every worker sees every record.
    Prefect only hands a storage to out-of-process workers by its id, so it is saved (basepath
    only: credentials stay in each worker's environment) in the current API; call inside
    `shared_api`."""
    url = config.runner.result_storage or (
        f"{config.results_root.rstrip('/')}/{RESULTS_DIR}" if _is_url(config.results_root) else None)
    if url is None:
        return None
    from prefect.filesystems import RemoteFileSystem

    storage = RemoteFileSystem(basepath=url.rstrip("/"))
    storage.save(f"sae-transfer-results-{hashlib.sha256(url.encode()).hexdigest()[:12]}", overwrite=True)
    return storage


def flow_options(config) -> dict:
    """`Flow.with_options` arguments that run a flow of `config`'s study where its runner section
    says, with its task-result records where every worker sees them (inside `shared_api`)."""
    options = {"task_runner": task_runner(config.runner)}
    storage = task_records(config)
    if storage is not None:
        options.update(result_storage=storage, result_serializer="json")
    return options


_EPHEMERAL: set[str] = set()  # API URLs of the temporary servers `shared_api` started in this process


def _api_configured_by_user() -> bool:
    """True when the Prefect API is a server the user configured (other hosts may reach it), not
    the temporary one `shared_api` started on this host's loopback."""
    url = get_current_settings().api.url
    return bool(url) and url not in _EPHEMERAL


@contextlib.contextmanager
def shared_api():
    """One Prefect API for the flow and its worker processes. With a server configured
    (PREFECT_API_URL) there is nothing to do; otherwise start the ephemeral server once here and
    point this process and the workers at it, so every task run is recorded in one place (and
    no worker starts a temporary server of its own)."""
    if get_current_settings().api.url:
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=get_current_settings().server.ephemeral.startup_timeout_seconds)
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url  # what the workers' environment is built from
    _EPHEMERAL.add(server.api_url)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        _EPHEMERAL.discard(server.api_url)
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


async def _task_runs(flow_run_id):
    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def step_timings() -> dict[str, tuple[float, bool | None]]:
    """Task run name -> (seconds it ran, whether Prefect served it from the cache; None for
    bookkeeping tasks tagged ALWAYS_RUNS, which run every time by design)."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    flow_run_id = get_run_context().flow_run.id
    runs = run_coro_as_sync(_task_runs(flow_run_id)) or []
    timings: dict[str, tuple[float, bool]] = {}
    for r in sorted(runs, key=lambda r: r.expected_start_time or r.created):
        if r.state and r.state.state_details.child_flow_run_id:
            continue  # a subflow (the checkpoint watcher) is not a step of its own
        name, n = r.name, 1
        while name in timings:  # same task on several hooks
            n += 1
            name = f"{r.name}#{n}"
        cached = None if ALWAYS_RUNS in (r.tags or []) else r.state_name == "Cached"
        timings[name] = (r.total_run_time.total_seconds(), cached)
    return timings


def current_run_id() -> str:
    """The id of the flow run we are in."""
    return str(get_run_context().flow_run.id)
