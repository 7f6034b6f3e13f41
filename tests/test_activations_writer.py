"""Activation cache writing: schema, shards/manifest, content-addressed names, and the cached
vectors against the Hugging Face model's own hidden states."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sae_transfer.activations import CacheConfig, cache_activations, dataset_metas
from sae_transfer.corpus import ROLE_CODE, CorpusConfig
from sae_transfer.errors import UserError
from sae_transfer.storage.activations import (
    KEY_FIELDS,
    MANIFEST,
    PROGRESS,
    ActivationDataset,
    dataset_dirname,
    decode_acts,
    is_complete,
)
from tests._tiny import tiny_corpus_dir, tiny_model_dir, write_synthetic_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"), d_model=32, n_layers=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return CorpusConfig(source=str(tiny_corpus_dir(tmp_path_factory.mktemp("corpus"), n_copies=1)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_synthetic_roundtrip_is_exact_and_sharded(tmp_path, dtype):
    path = write_synthetic_dataset(tmp_path / "ds", n_rows=5000, d_model=24, dtype=dtype, shard_bytes=40_000)
    ds = ActivationDataset(path)
    assert ds.n_tokens == 5000 and ds.d_model == 24 and ds.dtype == dtype
    assert len(ds.shards) > 1
    assert not list(path.glob("*.tmp")) and not (path / PROGRESS).exists()
    table = ds.read_table()
    acts = ds.acts(table).float()
    assert acts.shape == (5000, 24)
    ids = torch.arange(5000, dtype=torch.float32)
    exact = ids <= (256 if dtype == "bfloat16" else 2048)
    assert torch.equal(acts[exact, 0], ids[exact])
    assert table.column("seq_id").to_numpy().tolist() == (np.arange(5000) // 32).tolist()
    meta = pq.read_schema(ds.shards[0]).metadata
    assert json.loads(meta[b"dtype"]) == dtype and json.loads(meta[b"d_model"]) == 24
    manifest = json.loads((path / MANIFEST).read_text())
    assert sum(s["rows"] for s in manifest["shards"]) == 5000
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    ds.verify()


def test_decode_acts_is_zero_copy(tmp_path):
    ds = ActivationDataset(write_synthetic_dataset(tmp_path / "ds", n_rows=512, d_model=8))
    col = pq.ParquetFile(ds.shards[0]).read_row_group(0, columns=["act"]).column("act")
    acts = decode_acts(col, 8, "float32")
    assert acts.data_ptr() == col.chunk(0).buffers()[1].address


def test_dataset_name_changes_with_every_key_field():
    base = {k: "x" for k in KEY_FIELDS} | {"n_tokens": 1000, "model_id": "m", "hook": "blocks.0.hook_resid_pre"}
    name = dataset_dirname(base)
    assert name.startswith("m__blocks.0.hook_resid_pre__x-1k__") and name == dataset_dirname(dict(base))
    for key in KEY_FIELDS:
        changed = dict(base, **{key: 2000 if key == "n_tokens" else "y"})
        assert dataset_dirname(changed) != name, key


def test_missing_manifest_is_not_a_dataset(tmp_path):
    path = write_synthetic_dataset(tmp_path / "ds", n_rows=600, d_model=8)
    (path / MANIFEST).unlink()
    assert not is_complete(path)
    with pytest.raises(UserError, match="manifest.json is missing"):
        ActivationDataset(path)


def _hf_hidden_states(model_dir, ids_NS):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        return hf(ids_NS, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_cached_resid_pre_matches_hf_hidden_states(tmp_path, tiny, corpus, dtype, atol):
    hooks = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre")
    cfg = CacheConfig(model=str(tiny), hooks=hooks, corpus=corpus, n_tokens=1000,
                      context_size=48, dtype=dtype, batch_tokens=300)
    records = cache_activations(cfg, tmp_path / "out", progress=False)
    assert [r.hook for r in records] == list(hooks) and not any(r.reused for r in records)
    for layer, record in enumerate(records):
        ds = ActivationDataset(record.path)
        assert ds.n_tokens == 1000 and ds.hook == hooks[layer] and ds.meta["model_revision"].startswith("sha256:")
        table = ds.read_table()
        seq, pos = table.column("seq_id").to_numpy(), table.column("pos").to_numpy()
        assert seq.max() == 1000 // 48 and (pos[seq == seq.max()] < 1000 % 48).all()  # cut to exactly n_tokens
        roles = table.column("role").to_pylist()
        assert all((r == "bos") == (p == 0) for r, p in zip(roles, pos))
        token_ids = table.column("token_id").to_numpy()
        full = (seq < seq.max())
        ids_NS = torch.from_numpy(token_ids[full].astype(np.int64)).reshape(-1, 48)
        hidden_NSD = _hf_hidden_states(tiny, ids_NS)[layer]
        got = ds.acts(table).float()[torch.from_numpy(full)]
        want = hidden_NSD.reshape(-1, 32)
        scale = want.abs().max()
        assert torch.allclose(got, want, atol=atol * float(scale), rtol=0), (got - want).abs().max()
        norms = torch.from_numpy(table.column("norm").to_numpy()[full])
        assert torch.allclose(norms, want.norm(dim=1), rtol=1e-4, atol=1e-5)


def test_second_identical_call_does_no_work(tmp_path, tiny, corpus, monkeypatch):
    cfg = CacheConfig(model=str(tiny), hooks=("blocks.1.hook_resid_pre",), corpus=corpus,
                      n_tokens=256, context_size=32)
    first = cache_activations(cfg, tmp_path, progress=False)
    import sae_transfer.activations as acts_mod

    monkeypatch.setattr(acts_mod, "load_model", lambda *a, **k: pytest.fail("model loaded again"))
    again = cache_activations(cfg, tmp_path, progress=False)
    assert again[0].reused and again[0].path == first[0].path
    other = dataset_metas(CacheConfig(model=str(tiny), hooks=("blocks.1.hook_resid_pre",),
                                      corpus=corpus, n_tokens=256, context_size=32,
                                      dtype="float16"))
    assert other["blocks.1.hook_resid_pre"]["dataset_key"] != first[0].path.name.rsplit("__", 1)[1]


def test_stop_early_gives_the_same_rows(tmp_path, tiny, corpus):
    rows = {}
    for stop in (True, False):
        cfg = CacheConfig(model=str(tiny), hooks=("blocks.0.hook_resid_pre",), corpus=corpus,
                          n_tokens=200, context_size=32, stop_early=stop)
        rec = cache_activations(cfg, tmp_path / str(stop), progress=False)[0]
        rows[stop] = ActivationDataset(rec.path).read_table()
    assert rows[True].equals(rows[False])


def test_role_codes_match_corpus():
    assert ROLE_CODE["bos"] == 0 and ROLE_CODE["text"] == 1
