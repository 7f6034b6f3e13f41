"""Wall time of the whole study on each task runner: threads, worker processes (the default), a
Dask LocalCluster started by the flow, and a long-lived Dask cluster reached by address (started
before the timing, as a lab's scheduler and workers are), first run and cached re-run, measured
in one run.

`threads` is Prefect's ThreadPoolTaskRunner with one thread (the steps one after another in the
flow's own process): with two, two model loads in one process race (transformers' meta-device
init: "Cannot copy out of meta tensor"), which is why the project runs heavy steps in processes.

    python bench/bench_runners.py                      # tiny preset, 2 workers each
    python bench/bench_runners.py --preset default --runners processes dask

Every runner studies the same pair (built once, before any timing) into a results folder of its
own, so each first run computes everything. Prints seconds per runner, the ratio of each to the
processes default, and the cached re-run as a fraction of the first run. Absolute numbers move
with machine load; compare the ratios (check `uptime` first).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

def study(root: Path, pair: Path, preset: str, runner: dict):
    from sae_transfer.study import parse_study

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests._tiny_study
    from tests._tiny_study import TINY_BUDGETS  # the tests' tiny study budgets

    data = {"name": "bench", "results_root": str(root),
            "pair": {"base": str(pair / "base"), "chat": str(pair / "chat"), "checkpoints": str(pair / "chat-checkpoints"),
                     "build_demo": True, "demo_preset": preset},
            "hooks": ["blocks.1.hook_resid_pre"], "runner": runner}
    return parse_study({**data, **(TINY_BUDGETS if preset == "tiny" else {})})


def timed(config, runner_name: str, workers: int) -> float:
    from prefect.task_runners import ThreadPoolTaskRunner

    from sae_transfer.flows._runs import flow_options
    from sae_transfer.flows.study import transfer_study

    options = flow_options(config)
    if runner_name == "threads":
        options["task_runner"] = ThreadPoolTaskRunner(max_workers=1)
    start = time.perf_counter()
    transfer_study.with_options(**options)(config)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["tiny", "default"], default="tiny", help="demo pair size and budgets")
    ap.add_argument("--workers", type=int, default=2, help="processes or Dask workers (threads: always 1)")
    ap.add_argument("--runners", nargs="+", default=["threads", "processes", "dask", "dask-address"],
                    choices=["threads", "processes", "dask", "dask-address"])
    args = ap.parse_args()

    from sae_transfer.demo.build import build_demo_pair
    from sae_transfer.demo.config import PRESETS
    from sae_transfer.flows._dask import local_cluster
    from sae_transfer.flows._runs import shared_api

    work = Path(tempfile.mkdtemp(prefix="bench-runners-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("SAE_TRANSFER_CACHE_DIR", str(work / "cache"))
    pair = work / "pair"
    build_demo_pair(pair, PRESETS[args.preset], progress=False)
    times: dict[str, tuple[float, float]] = {}
    with shared_api(), contextlib.ExitStack() as stack:
        for name in args.runners:
            runner = {"kind": "dask" if name.startswith("dask") else "processes", "workers": args.workers}
            if name == "dask-address":
                cluster = stack.enter_context(local_cluster(args.workers, [], "GPU"))
                runner["address"] = cluster.scheduler_address
            config = study(work / f"results-{name}", pair, args.preset, runner)
            first = timed(config, name, args.workers)
            again = timed(config, name, args.workers)
            times[name] = (first, again)
            print(f"{name:12s} first run {first:7.1f} s   cached re-run {again:6.1f} s ({again / first:.0%} of first)",
                  flush=True)
    base = times.get("processes")
    if base:
        for name, (first, again) in times.items():
            print(f"{name:12s} / processes: first run x{first / base[0]:.2f}, cached re-run x{again / base[1]:.2f}")
    print(f"({args.preset} preset, {args.workers} workers, {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
