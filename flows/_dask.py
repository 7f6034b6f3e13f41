"""The DAG on a Dask cluster: prefect-dask's `DaskTaskRunner`, with each heavy step asking the
scheduler for one GPU worker resource.

Three traps of Prefect on Dask, and what this module does about each (tests/test_dask_runner.py):
- Prefect 3 submits with `priority=0` (PrefectHQ/prefect#21608) and annotations were lost on an
  existing cluster (prefect-dask#47): the resource a heavy step needs is therefore passed as
  `resources=` on every `Client.submit`, never through `dask.annotate`; the tests check the
  restriction on the scheduler, for a cluster started here and for one reached by address.
- Remote workers cannot read results on the flow host's disk (prefect-ray#26, prefect#15783):
  Prefect's task-result records go to a store every worker reaches (`_runs.task_records`).
- Under the ephemeral API each worker process would start a Prefect server of its own: the
  workers of a cluster started here get the flow's PREFECT_API_URL in their environment, and a
  cluster elsewhere needs a Prefect server they can reach (`check_cluster` says so).
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture

from sae_transfer.errors import UserError

ALWAYS_RUNS = "always-runs"  # bookkeeping tasks (records, report): no device, no resource
CONNECT_TIMEOUT_S = 10  # an unreachable scheduler fails in seconds, not after the default 30 s
WORKER_WAIT_S = 60  # how long a scheduler may take to see its first worker


def local_cluster(n_workers: int, gpus: list[str], resource: str | None):
    """A Dask cluster on this host: `n_workers` single-threaded worker processes, each offering
    one `resource` (its device: a GPU, or the CPU share it runs one heavy step on), with
    cores / workers torch threads, the flow's Prefect API and, with several GPUs, a GPU of its
    own (CUDA_VISIBLE_DEVICES, set before the worker process imports torch). Its scheduler runs
    in this process: distributed's own INFO lines (about 150 a run: workers joining, leaving, the
    dashboard) are kept out of the flow's log, warnings and errors still show."""
    from distributed import Nanny, Scheduler, SpecCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    # At shutdown each nanny asks its worker process to exit and kills it after 4 s ("Worker process
    # still alive after 4.0 seconds, killing"), which a loaded host hits: every task has finished
    # and stored its result by then, so the warning says nothing a user can act on.
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)

    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n_workers))  # the user's, if set
    workers = {}
    for i in range(n_workers):
        env = {"OMP_NUM_THREADS": threads}
        if os.environ.get("PREFECT_API_URL"):
            env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"]  # shared_api's server, not one per worker
        if len(gpus) > 1:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        workers[i] = {"cls": Nanny, "options": {"nthreads": 1, "env": env, "host": "127.0.0.1", "silence_logs": logging.WARNING,
                                                "resources": {resource: 1} if resource else None}}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING, name="sae-transfer")


class StudyDaskRunner(DaskTaskRunner):
    """`DaskTaskRunner` whose heavy steps (every task not tagged `always-runs`) ask the scheduler
    for one `gpu_resource` of a worker, passed explicitly on each submit."""

    def __init__(self, *, gpu_resource: str | None = "GPU", **kwargs):
        super().__init__(**kwargs)
        self.gpu_resource = gpu_resource

    def duplicate(self) -> StudyDaskRunner:
        """The same runner, unstarted (Prefect builds one in every worker's task context)."""
        return type(self)(address=self.address, cluster_class=self.cluster_class, cluster_kwargs=self.cluster_kwargs,
                          client_kwargs=self.client_kwargs, gpu_resource=self.gpu_resource)

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and self.gpu_resource == getattr(other, "gpu_resource", None)

    def resources_of(self, task) -> dict[str, float] | None:
        """The worker resources `task` needs: one GPU for a heavy step, none for bookkeeping."""
        if self.gpu_resource is None or ALWAYS_RUNS in (task.tags or ()):
            return None
        return {self.gpu_resource: 1}

    def submit(self, task, parameters, wait_for=None, dependencies=None) -> PrefectDaskFuture:
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        future = self.client.submit(task, parameters=self._optimize_futures(parameters),
                                    wait_for=self._optimize_futures(wait_for) if wait_for else None,
                                    dependencies=dependencies, return_type="state", resources=self.resources_of(task))
        return PrefectDaskFuture(wrapped_future=future, task_run_id=future.task_run_id)


def _loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"tcp://{address}").hostname or ""
    return host in {"localhost", "127.0.0.1", "::1"} or host.startswith("127.")


def check_cluster(address: str, resource: str | None, api_configured: bool) -> dict[str, dict]:
    """Before a flow starts on the scheduler at `address`: it answers, a worker has joined, some
    worker offers `resource`, and (for a scheduler on another host) a Prefect server the workers
    can reach is configured. UserError naming the address and the setting to fix otherwise;
    returns worker address -> its resources."""
    from distributed import Client

    if not api_configured and not _loopback(address):
        raise UserError(f"runner.address {address!r} is on another host, whose workers cannot reach this process's "
                        "temporary Prefect server: start `prefect server start --host 0.0.0.0` and export "
                        "PREFECT_API_URL=http://<this host>:4200/api here and on every Dask worker")
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise UserError(f"no Dask scheduler answers at {address!r} ({type(exc).__name__}): start one with "
                        f"`dask scheduler`, or fix runner.address / --runner") from None
    try:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            raise UserError(f"the Dask scheduler at {address!r} has no worker after {WORKER_WAIT_S} s: start one per GPU "
                            f"with `dask worker {address} --nthreads 1 --resources {resource or 'GPU'}=1`") from None
        workers = {w: dict(info.get("resources") or {}) for w, info in client.scheduler_info()["workers"].items()}
    finally:
        client.close()
    if resource and not any(r.get(resource, 0) >= 1 for r in workers.values()):
        raise UserError(f"no worker of the Dask scheduler at {address!r} offers the resource {resource!r} that heavy "
                        f"steps ask for: start workers with `--resources {resource}=1`, or set runner.gpu_resource "
                        "to one they offer (empty: none)")
    return workers


def dask_runner(workers: int, gpus: list[str], address: str | None, resource: str | None) -> StudyDaskRunner:
    """The study's Dask task runner: on the scheduler at `address`, else on a `local_cluster`."""
    if address:
        return StudyDaskRunner(address=address, gpu_resource=resource,
                               client_kwargs={"timeout": CONNECT_TIMEOUT_S})
    return StudyDaskRunner(cluster_class=local_cluster, gpu_resource=resource,
                           cluster_kwargs={"n_workers": workers, "gpus": gpus, "resource": resource})
