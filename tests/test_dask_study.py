"""The tiny study on a two-worker Dask LocalCluster gives the same tables as on the default
worker processes (same pair, same seed), and its re-run is served from Prefect's cache; the
watcher on that cluster evaluates a checkpoint uploaded to an s3:// prefix exactly once."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pandas as pd
import pytest

from tests._tiny_study import tiny_study

pytestmark = pytest.mark.slow


def _compare_runs():
    path = Path(__file__).resolve().parents[1] / "bench" / "compare_runs.py"
    spec = importlib.util.spec_from_file_location("compare_runs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A run folder's name ends in a hash of its inputs, the results folder among them, which differs
# between the two studies by design; SAE ids (`<run folder>:<weights hash>`) keep the weights hash.
RUN_KEY = re.compile(r"-[0-9a-f]{16}(?=/|:|$)")


def _table(compare_runs, results: Path, name: str) -> pd.DataFrame:
    from sae_transfer.storage.tables import read_table

    df = compare_runs._normalised(read_table(results, name).to_pandas(), results)
    for col in df.columns:
        df[col] = df[col].map(lambda v: RUN_KEY.sub("-<key>", v) if isinstance(v, str) else v)
    keys = [c for c in df.columns if df[c].map(lambda v: isinstance(v, (str, int, float, bool)) or v is None).all()]
    return df.sort_values(keys).reset_index(drop=True) if len(df) else df


@pytest.fixture(scope="module")
def studies(tmp_path_factory, prefect_harness):
    """The tiny study run once on the default runner and once on a two-worker LocalCluster."""
    from sae_transfer.flows._runs import flow_options
    from sae_transfer.flows.study import transfer_study

    root = tmp_path_factory.mktemp("dask-study")
    local = tiny_study(root, name="local")
    on_dask = tiny_study(root, name="dask").model_copy(
        update={"runner": local.runner.model_copy(update={"kind": "dask", "workers": 2})})
    transfer_study(local)
    first = transfer_study.with_options(**flow_options(on_dask))(on_dask)
    return local, on_dask, first


def test_dask_cluster_gives_the_default_runners_tables(studies):
    from sae_transfer.flows._runs import flow_options
    from sae_transfer.flows.study import transfer_study
    from sae_transfer.storage.tables import SCHEMAS

    local, on_dask, first = studies
    assert first["cached_steps"] < first["steps"]
    compare_runs = _compare_runs()
    for name in SCHEMAS:
        if name == "runs":  # the study's name and config differ by design
            continue
        a, b = _table(compare_runs, local.results_dir, name), _table(compare_runs, on_dask.results_dir, name)
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
    again = transfer_study.with_options(**flow_options(on_dask))(on_dask)
    assert again["cached_steps"] == again["steps"]  # every heavy step a cache hit, on fresh workers


def test_watcher_on_the_cluster_evaluates_an_s3_checkpoint_once(studies, s3_store, monkeypatch):
    import fsspec

    from sae_transfer.flows._runs import flow_options
    from sae_transfer.flows.watch import watch_checkpoints
    from sae_transfer.storage import catalog

    _, on_dask, _ = studies
    s3_store.env(monkeypatch)  # before the cluster starts: its workers inherit the variables
    prefix = s3_store.url("chat-checkpoints")
    fs, path = fsspec.core.url_to_fs(prefix)
    chat = Path(on_dask.pair.chat)
    for file in sorted(p for p in chat.rglob("*") if p.is_file()):
        fs.put_file(str(file), f"{path}/step-000999/{file.relative_to(chat).as_posix()}")
    cfg = on_dask.model_copy(update={"pair": on_dask.pair.model_copy(update={"checkpoints": prefix})})
    out = watch_checkpoints.with_options(**flow_options(cfg))(cfg, build=False)
    assert [p.rsplit("@", 1)[0] for p in out["evaluated"]] == [f"{prefix}/step-000999"]
    rows = catalog.query(cfg.results_dir, "select count(*) from metrics where model_revision = 'step-999'").iloc[0, 0]
    assert rows > 0
    again = watch_checkpoints.with_options(**flow_options(cfg))(cfg, build=False)
    assert again["evaluated"] == []  # seen: never evaluated twice
