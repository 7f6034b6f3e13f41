"""Tasks: cache a model's activations at the study's hooks (one forward pass per batch), whole
on one worker, or split by sequence range over several (`activation_ranges`, then one
`cache_activation_range` per range, in parallel, then `merge_activation_ranges`)."""

from __future__ import annotations

from prefect import get_run_logger, task

from sae_transfer.activations import CacheConfig, cache_range, dataset_metas, merge_cache, split_cache
from sae_transfer.activations import cache_activations as cache
from sae_transfer.corpus import CorpusConfig
from sae_transfer.model_shapes import load_shape
from sae_transfer.plan import cache_bytes, require_free_space
from sae_transfer.storage.activations import dataset_dir, is_complete, staging_dir
from sae_transfer.storage.activations_write import SeqRange
from sae_transfer.storage.store import is_url
from sae_transfer.study import CorpusSection, ModelLoading
from sae_transfer.tasks._cache import cached, run_name
from sae_transfer.tasks.records import ActsRecord

_CODE = cached("sae_transfer.activations", "sae_transfer.corpus", "sae_transfer.models", "sae_transfer.storage.activations",
               "sae_transfer.storage.activations_write")


@task(name="cache-activations", task_run_name=run_name("cache-activations", "model"), **_CODE)
def cache_activations(
    model: str, hooks: list[str], corpus: CorpusSection, loading: ModelLoading, act_dtype: str, out_dir: str, *,
    revision: str | None = None,
) -> list[ActsRecord]:
    """Cache `corpus.train_tokens` training-split tokens of every hook of `model` under `out_dir`."""
    cfg = _config(model, hooks, corpus, loading, act_dtype, revision)
    check_disk(cfg, out_dir)
    done = cache(cfg, out_dir, progress=False)
    for d in done:
        get_run_logger().info("%s %s: %s (%d tokens)", model, d.hook, "reused" if d.reused else "cached", d.n_tokens)
    return [ActsRecord(path=str(d.path), model=model, hook=d.hook, n_tokens=d.n_tokens, reused=d.reused) for d in done]


def _config(model: str, hooks: list[str], corpus: CorpusSection, loading: ModelLoading, act_dtype: str,
            revision: str | None) -> CacheConfig:
    """The cache run of the study's training split for `model` (one definition for every task)."""
    return CacheConfig(
        model=model, hooks=tuple(hooks), n_tokens=corpus.train_tokens, context_size=corpus.context_size,
        corpus=CorpusConfig(source=corpus.source, text_column=corpus.text_column, seed=corpus.seed),
        dtype=act_dtype, model_dtype=loading.dtype, prepend_bos=corpus.prepend_bos, revision=revision,
        device=loading.device, split="train", trust_remote_code=loading.trust_remote_code,
    )


def activation_ranges(model: str, hooks: list[str], corpus: CorpusSection, loading: ModelLoading, act_dtype: str,
                      workers: int, *, revision: str | None = None, align_to_shards: bool = True,
                      ) -> list[tuple[int, int]]:
    """The (start, stop) sequence ranges that split `cache_activations`' work over up to `workers`
    workers: pass each to `cache_activation_range`, then all their results to
    `merge_activation_ranges`. With `align_to_shards`, cuts fall only where one writer closes a
    shard (d_model read from the model's config, no weights loaded), so the split dataset reads
    exactly like a one-worker one, row group by row group (and SAEs trained from it are the same);
    a cache of fewer shards than workers then gets fewer ranges. Without it, cuts fall on forward
    batches: the same rows, grouped differently."""
    cfg = _config(model, hooks, corpus, loading, act_dtype, revision)
    d_model = load_shape(cfg.model, cfg.revision, cfg.trust_remote_code).d_model if align_to_shards else None
    return [(r.start, r.stop) for r in split_cache(cfg, workers, d_model)]


@task(name="cache-activation-range", task_run_name=run_name("cache-range", "model", "start_seq"), **_CODE)
def cache_activation_range(
    model: str, hooks: list[str], corpus: CorpusSection, loading: ModelLoading, act_dtype: str, out_dir: str,
    start_seq: int, stop_seq: int, *, revision: str | None = None,
) -> list[ActsRecord]:
    """Cache sequences [start_seq, stop_seq) of every hook of `model` (one worker's share of a split
    cache; the other ranges may run at the same time, on other workers); `n_tokens` of each record
    counts this range's rows. Resumes this range's own complete shards after a kill."""
    cfg = _config(model, hooks, corpus, loading, act_dtype, revision)
    done = cache_range(cfg, out_dir, SeqRange(start_seq, stop_seq))
    get_run_logger().info("%s sequences %d..%d: %s", model, start_seq, stop_seq,
                          "reused" if all(d.reused for d in done) else "cached")
    return [ActsRecord(path=str(d.path), model=model, hook=d.hook, n_tokens=d.n_tokens, reused=d.reused) for d in done]


@task(name="merge-activation-ranges", task_run_name=run_name("merge-ranges", "model"), **_CODE)
def merge_activation_ranges(
    model: str, hooks: list[str], corpus: CorpusSection, loading: ModelLoading, act_dtype: str, out_dir: str,
    ranges: list[list[ActsRecord]], *, revision: str | None = None,
) -> list[ActsRecord]:
    """Write the manifest of every hook's split dataset once all `ranges` (the range tasks'
    results) are done; returns the same records as `cache_activations`. Fails, writing nothing,
    when a range is missing."""
    cfg = _config(model, hooks, corpus, loading, act_dtype, revision)
    done = merge_cache(cfg, out_dir)
    return [ActsRecord(path=str(d.path), model=model, hook=d.hook, n_tokens=d.n_tokens, reused=d.reused) for d in done]


def check_disk(cfg: CacheConfig, out_dir: str) -> None:
    """Refuse, in one line and before the model loads, a cache that would not fit the free space
    of `out_dir` (complete datasets need nothing; partial ones count what they already hold)."""
    paths = [dataset_dir(out_dir, meta) for meta in dataset_metas(cfg).values()]
    todo = [staging_dir(p) for p in paths if not is_complete(p)]  # written here (a store's: this host's mirror)
    if not todo:
        return
    d_model = load_shape(cfg.model, cfg.revision, cfg.trust_remote_code).d_model
    held = sum(f.stat().st_size for p in todo if p.is_dir() for f in p.rglob("*") if f.is_file())
    needed = cache_bytes(cfg.n_tokens, d_model, cfg.dtype, len(todo)) - held
    require_free_space(
        needed, out_dir if not is_url(out_dir) else todo[0].parent,
        f"caching {cfg.n_tokens} tokens x {len(todo)} hook(s) x d_model {d_model} of {cfg.model}",
        "train from live activations (sae.source: live), lower the token budget (corpus.train_tokens, or "
        "diffing.tokens for a diffing corpus) or set results_root to a disk with room")
