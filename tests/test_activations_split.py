"""One activation cache split by sequence range over several writers: each range writes its own
shards, one manifest joins them, and the rows (and row groups) equal a one-writer cache's."""

from __future__ import annotations

import json
import threading

import pyarrow.parquet as pq
import pytest

from sae_transfer.activations import CacheConfig, cache_activations, cache_range, merge_cache, split_cache
from sae_transfer.corpus import CorpusConfig
from sae_transfer.storage.activations import MANIFEST, ActivationDataset, is_complete
from sae_transfer.storage.activations_ranges import plan_ranges
from sae_transfer.storage.activations_write import SeqRange
from tests._tiny import tiny_corpus_dir, tiny_model_dir

HOOKS = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tiny = tiny_model_dir(tmp_path_factory.mktemp("model"), d_model=32, n_layers=2)
    corpus = CorpusConfig(source=str(tiny_corpus_dir(tmp_path_factory.mktemp("corpus"), n_copies=1)))
    # 1000 tokens of 40-token sequences (the last cut short), 3 sequences a batch, ~5 KiB shards
    return CacheConfig(model=str(tiny), hooks=HOOKS, corpus=corpus, n_tokens=1000, context_size=40,
                       batch_tokens=120, shard_bytes=5_000, row_group_rows=64)


@pytest.fixture(scope="module")
def single(cfg, tmp_path_factory):
    return cache_activations(cfg, tmp_path_factory.mktemp("single"), progress=False)


def _row_groups(path) -> list:
    ds = ActivationDataset(path)
    groups = []
    for shard in ds.shards:
        f = pq.ParquetFile(shard)
        groups += [f.read_row_group(i).drop_columns([]) for i in range(f.num_row_groups)]
    return groups


def test_three_workers_give_the_rows_and_row_groups_of_one(cfg, single, tmp_path):
    ranges = split_cache(cfg, workers=3, d_model=32)
    assert len(ranges) == 3 and ranges[0].start == 0 and ranges[-1].stop == 25
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))
    errors = []

    def work(r: SeqRange) -> None:  # the workers run at once, in one folder
        try:
            cache_range(cfg, tmp_path, r)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in ranges]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    merged = merge_cache(cfg, tmp_path)
    for one, split in zip(single, merged):
        assert split.path.name == one.path.name and not split.reused and split.n_tokens == 1000
        a, b = ActivationDataset(one.path), ActivationDataset(split.path)
        assert a.read_table().equals(b.read_table())  # every row, in order, byte for byte
        assert len(b.shards) == len(a.shards) > 3
        assert [g.num_rows for g in _row_groups(one.path)] == [g.num_rows for g in _row_groups(split.path)]
        assert all(x.equals(y) for x, y in zip(_row_groups(one.path), _row_groups(split.path)))
        assert b.manifest["norm_mean"] == a.manifest["norm_mean"] and b.manifest["scale_factor"] == a.manifest["scale_factor"]
        assert sorted(p.name for p in split.path.iterdir() if p.name.startswith(("_", "."))) == [MANIFEST]


def test_merge_refuses_a_missing_range_and_a_rerun_reuses(cfg, tmp_path, monkeypatch):
    ranges = split_cache(cfg, workers=2, d_model=32)
    cache_range(cfg, tmp_path, ranges[1])
    with pytest.raises(RuntimeError, match="missing or doubled"):
        merge_cache(cfg, tmp_path)
    assert not any(is_complete(p) for p in tmp_path.iterdir())
    cache_range(cfg, tmp_path, ranges[0])
    merged = merge_cache(cfg, tmp_path)
    assert all(ActivationDataset(m.path).n_tokens == 1000 for m in merged)
    import sae_transfer.activations as acts_mod

    monkeypatch.setattr(acts_mod, "load_model", lambda *a, **k: pytest.fail("model loaded for a complete dataset"))
    assert all(r.reused for r in cache_range(cfg, tmp_path, ranges[0]))
    assert all(r.reused for r in merge_cache(cfg, tmp_path))


def test_a_killed_range_resumes_from_its_own_shards(cfg, single, tmp_path):
    ranges = split_cache(cfg, workers=2, d_model=32)
    cache_range(cfg, tmp_path, ranges[0])
    folder = next(tmp_path.iterdir())
    record = json.loads(next(folder.glob("_range-*.json")).read_text())
    # as if the first range's writer died after its first shard: progress names one shard
    (folder / f"_range-{ranges[0].tag}.json").unlink()
    (folder / f"_progress-{ranges[0].tag}.jsonl").write_text(json.dumps(
        dict(record["shards"][0], key=record["meta"]["dataset_key"])) + "\n")
    (folder / f".shard-{ranges[0].tag}-00009.parquet.tmp").write_bytes(b"half")
    cache_range(cfg, tmp_path, ranges[0])
    cache_range(cfg, tmp_path, ranges[1])
    merged = merge_cache(cfg, tmp_path)
    one = {d.hook: d for d in single}
    for m in merged:
        assert ActivationDataset(m.path).read_table().equals(ActivationDataset(one[m.hook].path).read_table())


def test_plan_ranges_without_shapes_cuts_on_batches():
    ranges = plan_ranges(n_tokens=1000, context_size=40, batch_tokens=120, workers=4)
    assert [r.start for r in ranges] == [0, 6, 12, 18] and ranges[-1].stop == 25
    assert plan_ranges(100, 40, 120, workers=8) == [SeqRange(0, 3)]  # one batch: nothing to split


def test_range_tasks_give_the_whole_task_s_dataset(tmp_path):
    from sae_transfer.study import CorpusSection, ModelLoading
    from sae_transfer.tasks import activations as task

    tiny = tiny_model_dir(tmp_path / "model", d_model=32, n_layers=2)
    corpus = CorpusSection(source=str(tiny_corpus_dir(tmp_path / "corpus", n_copies=1)), context_size=40, train_tokens=1000)
    args = (str(tiny), list(HOOKS), corpus, ModelLoading(), "float32")
    from prefect.logging import disable_run_logger

    assert task.activation_ranges(*args, workers=4) == [(0, 25)]  # one shard: nothing to split it by
    assert task.activation_ranges(*args, workers=4, align_to_shards=False) == [(0, 25)]  # one forward batch
    with disable_run_logger():
        whole = task.cache_activations.fn(*args, str(tmp_path / "whole"))
        parts = [task.cache_activation_range.fn(*args, str(tmp_path / "split"), a, b) for a, b in ((10, 25), (0, 10))]
    assert [r.n_tokens for r in parts[0]] == [600, 600] and [r.n_tokens for r in parts[1]] == [400, 400]
    merged = task.merge_activation_ranges.fn(*args, str(tmp_path / "split"), parts)
    for w, m in zip(whole, merged):
        assert (w.hook, w.n_tokens) == (m.hook, m.n_tokens) == (w.hook, 1000)
        assert ActivationDataset(w.path).read_table().equals(ActivationDataset(m.path).read_table())
