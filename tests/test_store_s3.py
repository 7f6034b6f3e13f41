"""Results on an object store: tables, catalog, `sql` and `report` on an s3:// root of a real
S3 server (SeaweedFS, tests/_s3.py), configured only by the standard AWS variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_transfer.storage import catalog, tables
from sae_transfer.storage.fingerprint import fingerprint
from sae_transfer.storage.store import RemotePath, clean_leftovers, location
from tests import _synthetic_results as synth

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from sae_transfer.cli import main; main()"]


def _cli(*args, env: dict):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**os.environ, **env})


def _fill_remote(root: str, local: Path) -> None:
    """The synthetic study, written locally, then its tables appended to the store through
    tables.append_rows (and the training log uploaded as the trainer's part)."""
    synth.fill(local)
    for name in tables.SCHEMAS:
        t = tables.read_table(local, name)
        if t.num_rows:
            tables.append_rows(root, name, t)
    for part in (local / "saes").rglob("part-*.parquet"):
        (location(root) / part.relative_to(local).as_posix()).put_file(part)


@pytest.fixture
def remote(s3_store, monkeypatch, tmp_path):
    s3_store.env(monkeypatch)
    monkeypatch.setenv("SAE_TRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    return s3_store.url("results", "demo")


def test_tables_round_trip_and_catalog_answers_like_a_local_one(remote, tmp_path):
    _fill_remote(remote, tmp_path / "local")
    query = "select sae_model, model_id, outlier_policy, segment, ce_loss_score from metrics order by all"
    assert catalog.query(remote, query).equals(catalog.query(tmp_path / "local", query))
    logs = catalog.query(remote, "select sae_id, count(*) as n from training_log group by 1")
    assert logs.to_dict("records") == [{"sae_id": "base-sae", "n": 3}]
    assert tables.read_table(remote, "token_errors").num_rows == 10
    # the catalog is uploaded beside the tables; synced down, it opens in any DuckDB client
    down = tmp_path / "synced.duckdb"
    root = RemotePath(remote)
    root.fs.get_file(f"{root.key}/study.duckdb", str(down))
    n_rows = len(catalog.query(remote, "select * from metrics_history"))
    with duckdb.connect(str(down), read_only=True) as con:
        assert con.execute("select count(*) from metrics_history").fetchone()[0] == n_rows


def test_sql_and_report_commands_on_an_s3_root(remote, s3_store, tmp_path):
    _fill_remote(remote, tmp_path / "local")
    env = {**s3_store.environ(), "SAE_TRANSFER_CACHE_DIR": str(tmp_path / "cli-cache")}
    text_rows = "select count(*) as n from metrics where segment = 'text'"
    out = _cli("sql", text_rows, "--results", remote, "--format", "json", env=env)
    assert out.returncode == 0, out.stderr
    expected = int(catalog.query(tmp_path / "local", text_rows)["n"][0])
    assert json.loads(out.stdout) == [{"n": expected}]
    rep = _cli("report", "--results", remote, env=env)
    assert rep.returncode == 0, rep.stderr
    html = (location(remote) / "report" / "report.html").read_text()
    assert "Transfer matrix" in html or "transfer" in html.lower()
    missing = _cli("sql", "select 1", "--results", remote + "-nothing-here", env=env)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    denied = _cli("sql", "select 1", "--results", remote, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert denied.returncode == 2 and denied.stderr.count("\n") == 1 and "AWS_SECRET_ACCESS_KEY" in denied.stderr
    assert "wrong" not in denied.stderr  # the credential itself is never printed


def test_parts_appear_whole_or_not_at_all(remote, tmp_path):
    """A killed writer's upload never becomes a part: an aborted multipart upload and a stray
    temporary object are invisible to readers and the catalog."""
    tables.append_rows(remote, "metrics", [synth._metric(synth.BASE, synth.CHAT, "excluded", 0.5)])
    root = RemotePath(remote)
    fs = root.fs
    sink = pa.BufferOutputStream()
    pq.write_table(tables.to_table("metrics", [synth._metric(synth.BASE, synth.BASE, "excluded", 0.1)]), sink)
    data = sink.getvalue().to_pybytes()
    # a writer killed mid-upload: the multipart upload was started and a part sent, never completed
    bucket, key = f"{root.key}/metrics/part-99999999T000000000000Z-killed.parquet".split("/", 1)
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=data)
    (root / "metrics" / f".tmp-{os.getpid()}.parquet").write_bytes(data[: len(data) // 2])  # a local-style leftover
    assert tables.read_table(remote, "metrics").num_rows == 1
    assert catalog.query(remote, "select count(*) as n from metrics_history")["n"][0] == 1
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=root.key.split("/", 1)[1]).get("Uploads")
    assert clean_leftovers(remote, older_than_s=0) == 2  # the unfinished upload and the temp object
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=root.key.split("/", 1)[1]).get("Uploads")
    assert [p.name for p in (root / "metrics").iterdir()] == [tables.table_dir(remote, "metrics").glob("part-*")[0].name]


def test_local_leftovers_are_ignored_then_cleaned_when_old(tmp_path):
    tables.append_rows(tmp_path, "metrics", [synth._metric(synth.BASE, synth.CHAT, "excluded", 0.5)])
    stale = tmp_path / "metrics" / ".tmp-part-killed.parquet"
    stale.write_bytes(b"PAR1 half a part")
    assert catalog.query(tmp_path, "select count(*) as n from metrics_history")["n"][0] == 1
    assert stale.exists()  # young: maybe a live writer's
    os.utime(stale, (0, 0))
    assert clean_leftovers(tmp_path) == 1 and not stale.exists()


def test_fingerprints_come_from_etags_without_download(remote, monkeypatch):
    first = tables.append_rows(remote, "metrics", [synth._metric(synth.BASE, synth.CHAT, "excluded", 0.5)])
    folder = tables.table_dir(remote, "metrics")
    before = fingerprint(folder)
    assert fingerprint(str(folder)) == before and len(before) == 16
    reads = []
    fs = folder.fs
    for name in ("cat_file", "open", "_cat_file", "_open", "get_file"):
        if hasattr(fs, name):
            original = getattr(fs, name)
            monkeypatch.setattr(fs, name, lambda *a, _o=original, **k: reads.append(a) or _o(*a, **k))
    assert fingerprint(folder) == before
    tables.append_rows(remote, "metrics", [synth._metric(synth.BASE, synth.BASE, "excluded", 0.6)])
    changed = fingerprint(folder)
    assert changed != before and fingerprint(first) != changed
    assert reads == []  # only listings: no object was read
    first.write_bytes(b"not the same bytes")
    assert fingerprint(folder) != changed


def test_standard_variables_are_all_it_takes(remote):
    fs, _ = fsspec.core.url_to_fs(remote)
    assert type(fs).__name__ == "S3FileSystem"
    assert location(remote) == RemotePath(remote) and location("file:///x/y") == Path("/x/y")
    assert str(location(remote) / "metrics") == remote + "/metrics"


def test_activation_cache_on_the_store_reads_like_a_local_one(s3_store, monkeypatch, tmp_path):
    """Written once on the store (shards, then the manifest), opened from a fresh host by ETag
    fetch; a split cache (two ranges, merged on the store) has the same rows."""
    from sae_transfer.activations import (
        CacheConfig,
        cache_activations,
        cache_range,
        dataset_metas,
        merge_cache,
        split_cache,
    )
    from sae_transfer.corpus import CorpusConfig
    from sae_transfer.storage.activations import ActivationDataset, dataset_dir, is_complete
    from tests._tiny import tiny_corpus_dir, tiny_model_dir

    s3_store.env(monkeypatch)
    monkeypatch.setenv("SAE_TRANSFER_CACHE_DIR", str(tmp_path / "writer-host"))
    tiny = tiny_model_dir(tmp_path / "model", d_model=32, n_layers=2)
    corpus = CorpusConfig(source=str(tiny_corpus_dir(tmp_path / "corpus", n_copies=1)))
    cfg = CacheConfig(model=str(tiny), hooks=("blocks.1.hook_resid_pre",), corpus=corpus, n_tokens=1000,
                      context_size=40, batch_tokens=120, shard_bytes=5_000, row_group_rows=64)
    local = cache_activations(cfg, tmp_path / "local", progress=False)[0]
    root = s3_store.url("activations")
    remote = cache_activations(cfg, root, progress=False)[0]
    assert isinstance(remote.path, RemotePath) and is_complete(remote.path)
    assert cache_activations(cfg, root, progress=False)[0].reused
    want = ActivationDataset(local.path).read_table()
    assert ActivationDataset(remote.path).read_table().equals(want)  # the writer's host: its own mirror
    monkeypatch.setenv("SAE_TRANSFER_CACHE_DIR", str(tmp_path / "reader-host"))
    fresh = ActivationDataset(str(remote.path))
    assert str(tmp_path / "reader-host") in str(fresh.path) and fresh.read_table().equals(want)

    split_root = s3_store.url("split")
    for r in split_cache(cfg, workers=2, d_model=32):
        monkeypatch.setenv("SAE_TRANSFER_CACHE_DIR", str(tmp_path / f"worker-{r.start}"))  # no shared disk
        cache_range(cfg, split_root, r)
    assert not is_complete(dataset_dir(split_root, dataset_metas(cfg)[cfg.hooks[0]]))  # ranges only, no manifest
    merged = merge_cache(cfg, split_root)[0]
    assert ActivationDataset(merged.path).read_table().equals(want)


def test_sae_runs_on_the_store_are_published_whole_and_found_done_elsewhere(s3_store, monkeypatch, tmp_path):
    """train-sae with an s3:// run folder: trained in the host's mirror, published with run.json
    last; another host (no shared disk) finds it done without training, and loads it by URL."""
    from prefect.logging import disable_run_logger

    from sae_transfer.evals.loading import load_saes
    from sae_transfer.study import SAESection
    from sae_transfer.tasks import sae as sae_task
    from sae_transfer.tasks.records import ActsRecord
    from tests._tiny import write_synthetic_dataset

    s3_store.env(monkeypatch)
    monkeypatch.setenv("SAE_TRANSFER_CACHE_DIR", str(tmp_path / "host-a"))
    local = write_synthetic_dataset(tmp_path / "acts", n_rows=2048, d_model=16, dtype="float32", shard_bytes=40_000)
    acts_url = s3_store.url("activations", local.name)
    for f in sorted(local.iterdir(), key=lambda p: p.name == "_manifest.json"):  # manifest last
        (location(acts_url) / f.name).put_file(f)
    acts = ActsRecord(path=acts_url, model="m", hook="blocks.0.hook_resid_pre", n_tokens=2048, reused=False)
    section = SAESection(expansion=2, train_tokens=1024, batch_size=256, source="cache")
    run_url = s3_store.url("saes", "base-run")
    with disable_run_logger():
        record = sae_task.train_sae.fn(acts, section, "base", run_url, device="cpu")
    assert record.path == run_url + "/sae" and record.run_dir == run_url
    assert (location(run_url) / "run.json").exists() and (location(run_url) / "sae" / "sae_weights.safetensors").exists()
    import sae_transfer.training.run as run_mod

    monkeypatch.setenv("SAE_TRANSFER_CACHE_DIR", str(tmp_path / "host-b"))  # another host, empty cache
    for name in ("fresh_run", "restore"):  # a new or resumed training run would start with one of these
        monkeypatch.setattr(run_mod, name, lambda *a, **k: pytest.fail("trained again"))
    with disable_run_logger():
        again = sae_task.train_sae.fn(acts, section, "base", run_url, device="cpu")
    assert again.path == record.path and again.final_metrics == record.final_metrics
    loaded = load_saes([record.path], "blocks.0.hook_resid_pre")[0]
    assert loaded.sae.cfg.d_sae == 32 and loaded.info["sae_id"].startswith("base-run:")  # named by its run, as locally
    assert list((tmp_path / "host-b").rglob("sae_weights.safetensors"))  # fetched into host b's mirror
