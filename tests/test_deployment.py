"""A real deployment run: `prefect server start` on loopback, a process work pool, `prefect deploy`
from prefect.yaml, a worker, and a deployment run to completion whose rows land in DuckDB."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sae_transfer.storage import catalog
from tests._tiny_study import tiny_study

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"prefect server not healthy after {seconds} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_deploy_and_run_transfer_study(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", SAE_TRANSFER_HOME=str(REPO),
               PREFECT_LOGGING_LEVEL="WARNING")
    cfg = tiny_study(tmp_path, name="deployed")
    run = lambda *args, timeout=300: subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True,  # noqa: E731
                                                    text=True, timeout=timeout)
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        _wait_healthy(api, server, 180)
        pool = run("work-pool", "create", "sae-transfer", "--type", "process")
        assert pool.returncode == 0, pool.stderr[-2000:]
        deployed = run("--no-prompt", "deploy", "--all")
        assert deployed.returncode == 0, (deployed.stdout + deployed.stderr)[-3000:]
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "sae-transfer"], env=env, cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        params = json.dumps({"config": cfg.model_dump()})
        result = run("deployment", "run", "transfer_study/demo-study", "--params", params, "--watch", timeout=900)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert "Completed" in result.stdout + result.stderr
    finally:
        for proc in (worker, server):
            if proc is not None:
                _stop(proc)
    metrics = catalog.query(cfg.results_dir, "select count(*) as n from metrics where segment = 'text'")
    assert metrics["n"][0] >= 12
    runs = catalog.query(cfg.results_dir, "select distinct flow from runs")
    assert "transfer_study" in set(runs["flow"])
    shutil.rmtree(tmp_path / "prefect-home", ignore_errors=True)
