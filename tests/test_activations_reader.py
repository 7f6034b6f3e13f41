"""ActivationReader: exact batch sizes, shuffling without repeats, filters, resume, finiteness,
dtypes, and memory bounded by the buffer (not the dataset)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sae_transfer.errors import UserError
from sae_transfer.storage.activations import ActivationDataset
from sae_transfer.storage.activations_read import ActivationReader, RowFilter
from tests._tiny import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("acts") / "ds", n_rows=6000, d_model=8,
                                   shard_bytes=60_000, row_group_rows=500)


def _row_ids(batch_BD: torch.Tensor) -> list[int]:
    return batch_BD[:, 0].long().tolist()


def test_one_epoch_yields_full_batches_without_repeats(ds_path):
    reader = ActivationReader(ds_path, batch_size=256, buffer_tokens=1024, seed=1, epochs=1)
    batches = list(reader)
    assert all(b.shape == (256, 8) and b.dtype == torch.float32 for b in batches)
    assert len(batches) == 6000 // 256 and reader.batches_yielded == len(batches)
    ids = [i for b in batches for i in _row_ids(b)]
    assert len(set(ids)) == len(ids)  # each row at most once per epoch
    assert ids[:256] != sorted(ids[:256])  # shuffled within a batch
    spread = torch.tensor(_row_ids(batches[0])).float().std()
    assert spread > 500  # a batch mixes several row groups, not one


def test_same_seed_same_batches_other_seed_differs(ds_path):
    a = list(ActivationReader(ds_path, batch_size=200, buffer_tokens=800, seed=3, epochs=1))
    b = list(ActivationReader(ds_path, batch_size=200, buffer_tokens=800, seed=3, epochs=1))
    c = list(ActivationReader(ds_path, batch_size=200, buffer_tokens=800, seed=4, epochs=1))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not torch.equal(a[0], c[0])


def test_epochs_reshuffle_and_loop(ds_path):
    reader = ActivationReader(ds_path, batch_size=500, buffer_tokens=1500, seed=0, epochs=None)
    per_epoch = 6000 // 500
    first, second = (list(itertools.islice(iter_, per_epoch)) for iter_ in [iter(reader)] * 2)
    assert reader.batches_yielded == 2 * per_epoch
    assert sorted(i for b in first for i in _row_ids(b)) == list(range(6000))
    assert not torch.equal(first[0], second[0])


@pytest.mark.parametrize("row_filter", [RowFilter(), RowFilter(drop_roles=("bos", "user"), min_pos=3, max_norm=4.0)])
def test_resume_from_start_batch_matches_uninterrupted(ds_path, row_filter):
    kwargs = dict(batch_size=128, buffer_tokens=640, seed=7, row_filter=row_filter, epochs=3)
    full = list(ActivationReader(ds_path, **kwargs))
    for start in (1, 5, len(full) // 3 + 2):  # the last one lands in the second epoch
        resumed = ActivationReader(ds_path, start_batch=start, **kwargs)
        rest = list(resumed)
        assert len(rest) == len(full) - start
        assert all(torch.equal(x, y) for x, y in zip(full[start:], rest)), start
        assert resumed.batches_yielded == len(full)


def test_row_filter_is_applied(ds_path):
    table = ActivationDataset(ds_path).read_table(columns=["pos", "role", "norm"])
    pos, norm = table.column("pos").to_numpy(), table.column("norm").to_numpy()
    roles = table.column("role").to_pylist()
    row_filter = RowFilter(drop_roles=("bos", "user"), min_pos=3, max_norm=4.0)
    keep = {r for r in range(6000) if roles[r] == "text" and pos[r] >= 3 and norm[r] <= 4.0}
    got = [i for b in ActivationReader(ds_path, batch_size=100, buffer_tokens=400, row_filter=row_filter,
                                       epochs=1) for i in _row_ids(b)]
    assert set(got) <= keep and len(got) == (len(keep) // 100) * 100 and len(set(got)) == len(got)
    with pytest.raises(UserError, match="row filter leaves"):
        list(ActivationReader(ds_path, batch_size=100, buffer_tokens=400, row_filter=RowFilter(max_norm=0.0), epochs=1))


def test_non_finite_activation_names_shard_and_row_group(tmp_path):
    path = write_synthetic_dataset(tmp_path / "nan", n_rows=1200, d_model=8, row_group_rows=200,
                                   shard_bytes=10**9, nan_row=700)
    with pytest.raises(UserError, match=r"shard-00000\.parquet row group 3 \(row 100\)"):
        list(ActivationReader(path, batch_size=100, buffer_tokens=400, epochs=1))
    assert len(list(ActivationReader(path, batch_size=100, buffer_tokens=400, epochs=1, check_finite=False))) == 12


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_decodes(tmp_path, dtype):
    path = write_synthetic_dataset(tmp_path / dtype, n_rows=250, d_model=8, dtype=dtype, row_group_rows=50)
    ds = ActivationDataset(path)
    stored = ds.acts(ds.read_table()).float()
    batches = list(ActivationReader(path, batch_size=50, buffer_tokens=100, epochs=1, dtype=torch.float32))
    got = torch.cat(batches)
    assert got.dtype == torch.float32 and got.shape == (250, 8)
    assert torch.equal(got[got[:, 0].argsort()], stored)
    as_bf16 = next(iter(ActivationReader(path, batch_size=50, buffer_tokens=100, dtype=torch.bfloat16)))
    assert as_bf16.dtype == torch.bfloat16


def test_several_datasets_are_read_together(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", n_rows=300, d_model=8, row_group_rows=100)
    b = write_synthetic_dataset(tmp_path / "b", n_rows=300, d_model=8, row_group_rows=100)
    reader = ActivationReader([a, b], batch_size=100, buffer_tokens=200, epochs=1)
    assert reader.n_tokens == 600 and len(list(reader)) == 6
    c = write_synthetic_dataset(tmp_path / "c", n_rows=300, d_model=4, row_group_rows=100)
    with pytest.raises(UserError, match="one width"):
        ActivationReader([a, c])


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    torch.set_num_threads(1)  # two intra-op threads on a busy 2-core box run ~5x slower
    from sae_transfer.storage.activations_read import ActivationReader
    n = 0
    for acts in ActivationReader(sys.argv[1], batch_size=4096, buffer_tokens=32768, epochs=1):
        n += acts.shape[0]
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
    kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": n, "maxrss_kb": kb}))
""")


def _peak_rss_kb(paths: list[Path]) -> list[dict]:
    """Run the reader over each dataset in its own process (concurrently); their peak RSS."""
    procs = [subprocess.Popen([sys.executable, "-c", _RSS_SCRIPT, str(p), str(ROOT)], stdout=subprocess.PIPE, text=True)
             for p in paths]
    outs = [proc.communicate()[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def test_peak_memory_does_not_grow_with_dataset(tmp_path):
    small = write_synthetic_dataset(tmp_path / "small", n_rows=40_000, d_model=64, seq_len=128,
                                    shard_bytes=16 << 20, row_group_rows=4096)
    large = write_synthetic_dataset(tmp_path / "large", n_rows=400_000, d_model=64, seq_len=128,
                                    shard_bytes=16 << 20, row_group_rows=4096)
    one, ten = _peak_rss_kb([small, large])  # 10 MB vs 102 MB of activations
    assert ten["rows"] >= 10 * one["rows"] - 4096 * 10
    assert ten["maxrss_kb"] <= 1.2 * one["maxrss_kb"], (one, ten)
