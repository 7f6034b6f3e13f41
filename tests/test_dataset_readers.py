"""An activation dataset folder is a plain Parquet dataset: pandas and pyarrow open it as it is
(the manifest and progress log start with `_`, temp files with `.`), and folders written with
the old `manifest.json` name still read."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch

from sae_transfer.activations import CacheConfig, cache_activations
from sae_transfer.corpus import CorpusConfig
from sae_transfer.storage.activations import LEGACY_MANIFEST, MANIFEST, ActivationDataset, is_complete, read_manifest
from sae_transfer.storage.activations_read import ActivationReader
from sae_transfer.storage.activations_write import ActivationWriter
from tests._tiny import tiny_corpus_dir, tiny_model_dir, write_synthetic_dataset


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A real two-shard cache folder of a tiny Llama's blocks.1.hook_resid_pre (float16)."""
    root = tmp_path_factory.mktemp("readers")
    model = tiny_model_dir(root, d_model=32, n_layers=2)
    corpus = CorpusConfig(source=str(tiny_corpus_dir(root, n_copies=1)))
    cfg = CacheConfig(model=str(model), hooks=("blocks.1.hook_resid_pre",), corpus=corpus, n_tokens=700,
                      context_size=32, dtype="float16", batch_tokens=128, shard_bytes=20_000)
    return cache_activations(cfg, root / "out", progress=False)[0].path


def test_folder_holds_only_shards_under_visible_names(cached):
    visible = sorted(p.name for p in cached.iterdir() if not p.name.startswith(("_", ".")))
    assert len(visible) > 1 and all(n.startswith("shard-") and n.endswith(".parquet") for n in visible)
    assert (cached / MANIFEST).is_file() and not (cached / LEGACY_MANIFEST).exists()


def test_pandas_reads_the_folder(cached):
    ds = ActivationDataset(cached)
    want = ds.read_table()
    df = pd.read_parquet(cached)
    assert len(df) == ds.n_tokens == 700
    assert df["seq_id"].tolist() == want.column("seq_id").to_pylist()  # shard order = token order
    assert df["pos"].tolist() == want.column("pos").to_pylist()
    assert df["role"].astype(str).tolist() == want.column("role").to_pylist()
    # `act` comes back as raw bytes per row: decode and compare with the dataset's own decoding
    acts = np.frombuffer(b"".join(df["act"]), dtype=np.float16).reshape(700, 32)
    assert torch.equal(torch.from_numpy(acts.copy()), ds.acts(want))
    norm_from_act = torch.from_numpy(acts.astype(np.float32)).norm(dim=1)
    assert torch.allclose(norm_from_act, torch.from_numpy(df["norm"].to_numpy().copy()), rtol=2e-3)


def test_pyarrow_dataset_reads_the_folder(cached):
    ds = ActivationDataset(cached)
    table = pads.dataset(cached, format="parquet").to_table()
    assert table.num_rows == 700 and table.schema.field("act").type.byte_width == 32 * 2
    assert json.loads(table.schema.metadata[b"hook"]) == "blocks.1.hook_resid_pre"
    got = table.sort_by([("seq_id", "ascending"), ("pos", "ascending")])
    assert got.equals(ds.read_table().select(got.column_names))
    # predicate pushdown on the small columns, as an analyst would use it
    bos = pads.dataset(cached).to_table(filter=pads.field("pos") == 0)
    assert bos.num_rows == -(-700 // 32) and set(bos.column("role").to_pylist()) == {"bos"}


def test_legacy_manifest_folder_still_reads(tmp_path):
    path = write_synthetic_dataset(tmp_path / "old", n_rows=600, d_model=8)
    (path / MANIFEST).rename(path / LEGACY_MANIFEST)
    assert is_complete(path) and read_manifest(path)["n_tokens"] == 600
    ds = ActivationDataset(path)
    assert ds.n_tokens == 600
    batches = list(ActivationReader(path, batch_size=100, buffer_tokens=200, epochs=1))
    assert sum(b.shape[0] for b in batches) == 600


def test_rewriting_a_legacy_folder_leaves_one_manifest(tmp_path):
    path = write_synthetic_dataset(tmp_path / "old", n_rows=300, d_model=8)
    meta = read_manifest(path)["meta"]
    (path / MANIFEST).rename(path / LEGACY_MANIFEST)
    writer = ActivationWriter(path, meta)  # a rewrite: every earlier file is stale
    assert not (path / LEGACY_MANIFEST).exists() and not is_complete(path)
    rows = np.arange(300)
    acts = np.zeros((300, 8), dtype=np.float32)
    writer.append(rows // 32, (rows % 32).astype(np.int32), rows.astype(np.int32), np.ones(300, np.uint8),
                  np.zeros(300, np.float32), acts.view(np.uint8))
    writer.finish()
    assert (path / MANIFEST).is_file() and not (path / LEGACY_MANIFEST).exists()
    assert len(pd.read_parquet(path)) == 300


def test_manifest_scale_factor_is_sqrt_d_over_mean_norm(cached):
    manifest = read_manifest(cached)
    norms = pd.read_parquet(cached, columns=["norm"])["norm"].to_numpy().astype(np.float64)
    assert manifest["norm_mean"] == pytest.approx(norms.mean(), rel=1e-9)
    assert manifest["scale_factor"] == pytest.approx(32**0.5 / norms.mean(), rel=1e-9)


def test_failed_shard_finalisation_surfaces_and_resumes(tmp_path, monkeypatch):
    import sae_transfer.storage.activations_write as write_mod

    real, calls = write_mod.sha256_file, {"n": 0}

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("read error on shard-00001 (test)")
        return real(path)

    monkeypatch.setattr(write_mod, "sha256_file", flaky)
    with pytest.raises(OSError, match=r"read error on shard-00001 \(test\)"):
        write_synthetic_dataset(tmp_path / "ds", n_rows=4096, d_model=16, shard_bytes=20_000)
    assert not is_complete(tmp_path / "ds")
    monkeypatch.setattr(write_mod, "sha256_file", real)
    recorded = [json.loads(line) for line in (tmp_path / "ds" / "_progress.jsonl").read_text().splitlines()]
    assert [e["file"] for e in recorded] == ["shard-00000.parquet"]
    path = write_synthetic_dataset(tmp_path / "ds", n_rows=4096, d_model=16, shard_bytes=20_000)
    fresh = write_synthetic_dataset(tmp_path / "fresh", n_rows=4096, d_model=16, shard_bytes=20_000)
    assert ActivationDataset(path).read_table().equals(ActivationDataset(fresh).read_table())
