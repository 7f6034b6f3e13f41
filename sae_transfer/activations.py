"""Run a model over token batches and collect several hooks from ONE forward pass per batch,
then write each hook's activations to its own content-addressed Parquet dataset.

`sae_transfer.hook_batches.iter_hook_batches` is the pure part (torch only). `cache_activations` wires it to the corpus
and to `sae_transfer.storage.activations_write`: it computes each dataset's folder from what determines it
(so a finished dataset is found without loading the model), resumes a killed run from its
complete shards, and writes in a background thread so encoding overlaps the next forward pass.

On a GPU the hook only launches work: norms and the cast to the storage dtype run on the device,
and non-blocking copies on a side stream fill pinned host buffers, with one CUDA event per
batch. The writer threads wait for that event, so the main thread never synchronises with the
device and the next forward pass overlaps the copies, the Parquet encoding and the disk.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_transfer.attention import attention_of, check_choice
from sae_transfer.corpus import CorpusConfig, corpus_fingerprint, tokenize_sequences
from sae_transfer.errors import UserError
from sae_transfer.hook_batches import HookBatch, iter_hook_batches
from sae_transfer.models import DTYPES, check_hooks, load_model, model_identity
from sae_transfer.sae.scaling import scale_factor
from sae_transfer.storage.activations import (
    FORMAT_VERSION,
    dataset_dir,
    dataset_key,
    is_complete,
    publish_dataset,
    read_manifest,
    staging_dir,
)
from sae_transfer.storage.activations_ranges import merge_ranges, plan_ranges
from sae_transfer.storage.activations_write import (
    ActivationWriter,
    SeqRange,
    WriterConfig,
    range_rows,
)
from sae_transfer.storage.background_writer import BackgroundWriter
from sae_transfer.storage.store import RemotePath

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheConfig:
    """One `sae-transfer cache` run: which model, hooks, corpus and token budget."""

    model: str  # Hugging Face id or local checkpoint folder
    hooks: tuple[str, ...]  # hook names, all cached from the same forward passes
    corpus: CorpusConfig = CorpusConfig()  # text source and train/eval split rule
    n_tokens: int = 1_000_000  # rows per dataset (exact; the last sequence is cut to fit)
    context_size: int = 128  # tokens per sequence, BOS included
    dtype: str = "float32"  # stored element dtype: float32, float16 or bfloat16
    model_dtype: str = "float32"  # dtype the model runs in (part of the dataset key)
    batch_tokens: int = 16384  # tokens per forward pass, rounded down to whole sequences
    split: str = "train"  # corpus split: train or eval
    prepend_bos: bool = True  # put the tokenizer's BOS at position 0 of every sequence
    revision: str | None = None  # Hub revision of the model
    trust_remote_code: bool = False  # let a Hub model's own modelling code run (not part of the dataset key)
    device: str | None = None  # None: CUDA when available, else CPU
    stop_early: bool = True  # skip the layers after the deepest hook
    shard_bytes: int = 128 << 20  # bytes per Parquet shard
    row_group_rows: int | None = None  # rows per row group; None picks ~16 MiB groups
    checksum: bool = True  # sha256 of each shard in the manifest
    attn_implementation: str = "auto"  # auto (SDPA on CUDA, eager on CPU), eager (bit-exact with HF eager) or sdpa
    write_queue: int = 3  # batches waiting per hook for its writer thread (host memory ~ (write_queue + 2) batches)


@dataclass(frozen=True)
class CachedDataset:
    """What `cache_activations` did for one hook."""

    hook: str  # hook name
    path: Path | RemotePath  # the dataset folder (a prefix on an object store)
    n_tokens: int  # rows in the finished dataset
    reused: bool  # True when a complete dataset was already there (no work done)
    resumed_rows: int  # rows kept from an interrupted earlier run


def dataset_metas(cfg: CacheConfig) -> dict[str, dict]:
    """Per hook, the metadata that determines its dataset (computed without loading the model)."""
    if cfg.dtype not in DTYPES or cfg.model_dtype not in DTYPES:
        raise UserError(f"unknown dtype {cfg.dtype!r}/{cfg.model_dtype!r}: use one of {', '.join(DTYPES)}")
    if cfg.n_tokens < 1 or cfg.context_size < 2:
        raise UserError(f"need n_tokens >= 1 and context_size >= 2, got {cfg.n_tokens} and {cfg.context_size}")
    if len(set(cfg.hooks)) != len(cfg.hooks) or not cfg.hooks:
        raise UserError(f"pass each hook once (got {list(cfg.hooks)})")
    check_choice(cfg.attn_implementation, cfg.hooks)
    if cfg.write_queue < 1:
        raise UserError(f"write_queue is {cfg.write_queue}: pass at least 1 batch")
    identity = model_identity(cfg.model, cfg.revision)
    local = identity["model_revision"].startswith("sha256:")
    base = {
        # a local folder is identified by its content, not by the path it was given as
        "model_id": Path(cfg.model).expanduser().resolve().name if local else identity["model_id"],
        "model_revision": identity["model_revision"],
        "model_source": cfg.model,  # as given (provenance only; not part of the dataset key)
        "corpus": cfg.corpus.source,
        "corpus_fingerprint": corpus_fingerprint(cfg.corpus),
        "split": cfg.split,
        "n_tokens": cfg.n_tokens,
        "context_size": cfg.context_size,
        "dtype": cfg.dtype,
        "model_dtype": cfg.model_dtype,
        "prepend_bos": cfg.prepend_bos,
    }

    metas = {}
    for hook in cfg.hooks:
        meta = dict(base, hook=hook, format_version=FORMAT_VERSION)
        metas[hook] = dict(meta, dataset_key=dataset_key(meta))
    return metas


def cache_activations(cfg: CacheConfig, out_dir: str | Path, progress: bool = True) -> list[CachedDataset]:
    """Cache every hook of `cfg` under `out_dir`; returns one record per hook, in `cfg.hooks` order.

    Complete datasets are reused untouched (the model is not even loaded when all are).
    """
    metas = dataset_metas(cfg)
    paths = {h: dataset_dir(out_dir, m) for h, m in metas.items()}
    todo = [h for h in cfg.hooks if not is_complete(paths[h])]
    if not todo:
        return [CachedDataset(h, paths[h], read_manifest(paths[h])["n_tokens"], True, 0) for h in cfg.hooks]
    model, seqs = _model_and_sequences(cfg, todo)
    staged = {h: staging_dir(paths[h]) for h in todo}
    resumed = _write_datasets(model, seqs, cfg, {h: metas[h] for h in todo}, staged, progress)
    for h in todo:
        publish_dataset(staged[h], paths[h])
    return [CachedDataset(h, paths[h], cfg.n_tokens, h not in todo, resumed.get(h, 0)) for h in cfg.hooks]


def _model_and_sequences(cfg: CacheConfig, hooks: list[str]):
    """The model a cache run reads (checked to serve `hooks`) and the sequences it runs it on."""
    model = load_model(cfg.model, revision=cfg.revision, device=cfg.device, dtype=cfg.model_dtype,
                       trust_remote_code=cfg.trust_remote_code,
                       attn_implementation=check_choice(cfg.attn_implementation, cfg.hooks))
    check_hooks(model, hooks)
    return model, tokenize_sequences(cfg.corpus, model.tokenizer, context_size=cfg.context_size,
                                     n_tokens=cfg.n_tokens, split=cfg.split, prepend_bos=cfg.prepend_bos)


def split_cache(cfg: CacheConfig, workers: int, d_model: int | None = None) -> list[SeqRange]:
    """Sequence ranges for caching `cfg` on up to `workers` workers (`cache_range` each, then
    `merge_cache`). With `d_model`, cuts fall where one writer closes a shard, so the split
    dataset's shards hold the same rows and row groups as a one-worker cache's."""
    if workers < 1:
        raise UserError(f"workers is {workers}: split the cache over at least 1 worker")
    row_bytes = None if d_model is None else d_model * DTYPES[cfg.dtype].itemsize
    return plan_ranges(cfg.n_tokens, cfg.context_size, cfg.batch_tokens, workers,
                       cfg.shard_bytes if row_bytes else None, row_bytes)


def cache_range(cfg: CacheConfig, out_dir: str | Path, seqs: SeqRange, progress: bool = False) -> list[CachedDataset]:
    """Cache sequences [seqs.start, seqs.stop) of every hook of `cfg` beside the other ranges'
    writers (one worker's share of a split cache); returns per hook the rows of this range.
    Resumes from this range's complete shards; does nothing for a complete dataset."""
    metas = dataset_metas(cfg)
    paths = {h: dataset_dir(out_dir, m) for h, m in metas.items()}
    todo = [h for h in cfg.hooks if not is_complete(paths[h])]
    want = range_rows(metas[cfg.hooks[0]], seqs)
    if not todo:
        return [CachedDataset(h, paths[h], want, True, 0) for h in cfg.hooks]
    model, tokens = _model_and_sequences(cfg, todo)
    staged = {h: staging_dir(paths[h]) for h in todo}
    resumed = _write_datasets(model, tokens, cfg, {h: metas[h] for h in todo}, staged, progress, seqs)
    for h in todo:
        publish_dataset(staged[h], paths[h], tag=seqs.tag)
    return [CachedDataset(h, paths[h], want, h not in todo, resumed.get(h, 0)) for h in cfg.hooks]


def merge_cache(cfg: CacheConfig, out_dir: str | Path) -> list[CachedDataset]:
    """Write the manifest of every hook's dataset whose ranges `cache_range` finished; returns one
    record per hook (reused for datasets already complete). RuntimeError when a range is missing."""
    metas = dataset_metas(cfg)
    out = []
    for h in cfg.hooks:
        path = dataset_dir(out_dir, metas[h])
        done = is_complete(path)
        manifest = read_manifest(path) if done else merge_ranges(path, scale_of=scale_factor)
        out.append(CachedDataset(h, path, manifest["n_tokens"], done, 0))
    return out


def _write_datasets(model, seqs, cfg: CacheConfig, metas: dict, paths: dict, progress: bool,
                    seq_range: SeqRange | None = None) -> dict[str, int]:
    """Forward the sequences (of `seq_range` only, when given) once, feeding every hook's writer;
    returns rows resumed per hook.

    Each hook's dataset is written by its own `BackgroundWriter` thread, which also waits for the
    batch's device-to-host copies: the main thread only launches forward passes.
    """
    hooks = list(metas)
    store_dtype = DTYPES[cfg.dtype]
    probe = next(iter_hook_batches(model, seqs.tokens_NS[:1, :2], hooks, batch_seqs=1, store_dtype=store_dtype))
    wcfg = WriterConfig(shard_bytes=cfg.shard_bytes, row_group_rows=cfg.row_group_rows, checksum=cfg.checksum)
    run = {"attn_implementation": attention_of(model), "device": str(next(model.parameters()).device)}
    writers = {}
    for h in hooks:
        meta = dict(metas[h], d_model=int(probe.acts[h].shape[-1]), tokens_fingerprint=seqs.fingerprint, **run)
        writers[h] = ActivationWriter(paths[h], meta, wcfg, seq_range)
    start_seq = min(w.next_seq for w in writers.values())
    tokens_NS = seqs.tokens_NS if seq_range is None else seqs.tokens_NS[:seq_range.stop]
    resumed = {h: w.rows_done for h, w in writers.items()}
    S = cfg.context_size
    batch_seqs = max(1, cfg.batch_tokens // S)
    sinks = {h: BackgroundWriter(writers[h], cfg.write_queue) for h in hooks}
    bar = tqdm(total=cfg.n_tokens, initial=min(start_seq * S, cfg.n_tokens), unit="tok", disable=not progress,
               desc="caching", leave=False)
    try:
        for batch in iter_hook_batches(model, tokens_NS, hooks, batch_seqs=batch_seqs, store_dtype=store_dtype,
                                       start_seq=start_seq, stop_early=cfg.stop_early, pipelined=True):
            rows = _batch_rows(batch, seqs, cfg.n_tokens)
            for h in hooks:
                sinks[h].put(functools.partial(_append_args, batch, h, rows))
            bar.update(len(rows["seq_id"]))
        for sink in sinks.values():
            sink.close()
        for w in writers.values():
            w.finish(scale_of=scale_factor)
    except BaseException:
        for sink in sinks.values():
            sink.close(abandon=True)
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    return resumed


def _append_args(batch: HookBatch, hook: str, rows: dict[str, np.ndarray]) -> tuple:
    """`ActivationWriter.append` arguments for `hook`'s rows of `batch` (runs on its writer thread)."""
    batch.wait([hook])
    n = len(rows["seq_id"])
    acts_ND = batch.acts[hook].reshape(-1, batch.acts[hook].shape[-1])[:n]
    acts_ND = acts_ND.view(torch.int16) if acts_ND.dtype == torch.bfloat16 else acts_ND  # numpy has no bf16
    act_u8 = acts_ND.numpy().view(np.uint8)
    return rows["seq_id"], rows["pos"], rows["token_id"], rows["role"], batch.norms[hook].reshape(-1)[:n].numpy(), act_u8


def _batch_rows(batch: HookBatch, seqs, n_tokens: int) -> dict[str, np.ndarray]:
    """Row columns (seq_id, pos, token_id, role) of a batch, cut so the dataset ends at n_tokens."""
    some = next(iter(batch.acts.values()))
    b, S = some.shape[:2]
    s0 = batch.seq_start
    n = min(b * S, n_tokens - s0 * S)
    return {
        "seq_id": np.repeat(np.arange(s0, s0 + b, dtype=np.int64), S)[:n],
        "pos": np.tile(np.arange(S, dtype=np.int32), b)[:n],
        "token_id": seqs.tokens_NS[s0:s0 + b].reshape(-1)[:n].numpy().astype(np.int32),
        "role": seqs.roles_NS[s0:s0 + b].reshape(-1)[:n].numpy(),
    }
