"""Stream cached activations as shuffled torch batches with bounded memory.

`ActivationReader` reads whole row groups (memory-mapped; the filter's small columns plus
`norm` and `act`) on a worker thread two groups ahead, drops filtered rows with numpy masks
before touching the vectors, copies the kept vectors once into a preallocated buffer of
`buffer_tokens` rows (stored dtype, viewed as wide ints because torch copies int64 elements
much faster than bytes), and emits batches as random gathers (`torch.index_select`) from it,
converted to `dtype` on `device`. Memory: `buffer_tokens * d_model * itemsize` plus three row
groups (~16 MiB each by default), whatever the dataset size.

Shuffling: per epoch the row-group order is a permutation drawn from (seed, epoch). The buffer
is filled, a random half of it is emitted as batches, the emitted slots are refilled, and so
on; when an epoch's data runs out, the rest of the buffer is emitted and the last partial batch
(fewer than `batch_size` rows) is dropped, so every batch has exactly `batch_size` rows and
each kept row appears at most once per epoch. The next epoch starts with an empty buffer.

Resuming: `start_batch=n` replays the first n batches on row ids only (reading no vectors,
only the filter columns when a filter is set), then loads the vectors the buffer holds at that
point, so the batches that follow are exactly those an uninterrupted reader yields.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae_transfer.errors import UserError
from sae_transfer.storage.activations import ELEMENT_DTYPES, ActivationDataset, decode_acts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowFilter:
    """Rows to leave out of training batches; evaluated on the small columns before `act` is decoded."""

    drop_roles: tuple[str, ...] = ()  # role names to skip, e.g. ("bos", "template")
    max_norm: float | None = None  # skip rows whose raw (unscaled) L2 norm exceeds this
    min_pos: int = 0  # skip positions before this (1 drops a prepended BOS position)

    @property
    def columns(self) -> list[str]:
        """The columns the filter reads."""
        return [c for c, on in (("role", self.drop_roles), ("norm", self.max_norm is not None),
                                ("pos", self.min_pos > 0)) if on]

    def mask(self, table: pa.Table) -> np.ndarray | None:
        """Boolean keep-mask over `table`'s rows, or None when every row is kept."""
        if not self.columns:
            return None
        keep = np.ones(table.num_rows, dtype=bool)
        if self.min_pos > 0:
            keep &= table.column("pos").to_numpy() >= self.min_pos
        if self.max_norm is not None:
            keep &= table.column("norm").to_numpy() <= self.max_norm
        if self.drop_roles:
            roles = table.column("role").combine_chunks()
            names = roles.dictionary.to_pylist()
            drop = [i for i, name in enumerate(names) if name in self.drop_roles]
            keep &= ~np.isin(roles.indices.to_numpy(zero_copy_only=False), drop)
        return keep


@dataclass
class _Loaded:
    """The kept rows of one row group: their row indices and (when loaded) their vectors."""

    group: int  # index into the reader's row-group table
    rows: np.ndarray  # int64 row indices within the row group that pass the filter
    words: torch.Tensor | None  # [len(rows), row_bytes / word size] raw vectors, or None while replaying
    offset: int = 0  # rows already moved into the buffer

    @property
    def remaining(self) -> int:
        return len(self.rows) - self.offset


class _Prefetch:
    """An epoch's row groups in order, each read on the reader's worker thread `depth` groups ahead."""

    def __init__(self, reader: ActivationReader, order: list[int], depth: int = 2):
        self.reader, self.order, self.depth = reader, order, depth
        self.next_index = 0
        self.futures: deque = deque()

    def _top_up(self, live: bool) -> None:
        while len(self.futures) < self.depth and self.next_index < len(self.order):
            g = self.order[self.next_index]
            self.next_index += 1
            self.futures.append((g, live, self.reader._pool.submit(self.reader._load, g, live)))

    def next(self, live: bool) -> _Loaded | None:
        """The next row group (with vectors when `live`), or None at the end of the epoch."""
        if self.depth == 0:  # synchronous reads
            if self.next_index == len(self.order):
                return None
            self.next_index += 1
            return self.reader._load(self.order[self.next_index - 1], live)
        self._top_up(live)
        if not self.futures:
            return None
        g, loaded_live, future = self.futures.popleft()
        loaded = future.result()
        if live and not loaded_live:  # read during the replay, before vectors were needed
            loaded = self.reader._load(g, True)
        self._top_up(live)
        return loaded


class ActivationReader:
    """Iterate shuffled `acts_BD` batches (exactly `batch_size` rows) from one or more datasets.

    `epochs=None` loops forever; an int stops after that many passes. `batches_yielded` counts
    batches from the start of the stream (it starts at `start_batch`). Batches are `dtype` on
    `device`; the stored element dtype is converted on the way.
    """

    prefetch_row_groups = 2  # row groups read ahead on a worker thread (0: read inline)

    def __init__(
        self,
        path_or_paths: str | Path | Sequence[str | Path],
        batch_size: int = 4096,
        buffer_tokens: int = 262144,
        seed: int = 0,
        row_filter: RowFilter = RowFilter(),
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        epochs: int | None = None,
        start_batch: int = 0,
        check_finite: bool = True,
    ):
        paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
        self.datasets = [ActivationDataset(p) for p in paths]
        first = self.datasets[0]
        for ds in self.datasets[1:]:
            if (ds.d_model, ds.dtype) != (first.d_model, first.dtype):
                raise UserError(f"{ds.path} has d_model {ds.d_model} {ds.dtype}, {first.path} has "
                                f"{first.d_model} {first.dtype}: read datasets of one width and dtype together")
        if buffer_tokens < batch_size:
            raise ValueError(f"buffer_tokens={buffer_tokens} is smaller than batch_size={batch_size}: raise buffer_tokens")
        self.d_model, self.store_dtype = first.d_model, first.dtype
        self.row_bytes = first.row_bytes
        # gather rows as the widest int that divides them: torch copies wide elements ~10x faster
        self._word = next(w for w, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2), (torch.uint8, 1))
                          if self.row_bytes % size == 0)
        self.batch_size, self.buffer_tokens, self.seed = batch_size, buffer_tokens, seed
        self.row_filter, self.dtype, self.device = row_filter, dtype, torch.device(device)
        self.epochs, self.start_batch, self.check_finite = epochs, start_batch, check_finite
        self.batches_yielded = start_batch  # batches since the start of the stream
        self.files = [s for ds in self.datasets for s in ds.shards]
        self._footers = [pq.read_metadata(file) for file in self.files]
        groups = []
        for f, meta in enumerate(self._footers):
            groups += [(f, rg, meta.row_group(rg).num_rows) for rg in range(meta.num_row_groups)]
        self.groups = np.array(groups, dtype=np.int64).reshape(-1, 3)  # (file, row group, rows)
        self.group_base = np.concatenate([[0], np.cumsum(self.groups[:, 2])])  # global id of row 0
        self.n_tokens = int(self.group_base[-1])

    # -- row groups ---------------------------------------------------------------------
    def _file(self, f: int) -> pq.ParquetFile:
        # Opened per read with the cached footer: an open ParquetFile keeps its last row group's
        # buffers alive, so caching one per shard would grow memory with the number of shards.
        return pq.ParquetFile(self.files[f], metadata=self._footers[f], memory_map=True)

    def _load(self, g: int, with_acts: bool, rows: np.ndarray | None = None) -> _Loaded:
        """Read row group `g`: filter on the small columns, then the kept vectors (zero-copy view)."""
        f, rg, n = (int(x) for x in self.groups[g])
        filter_cols = self.row_filter.columns if rows is None else []
        check = ["norm"] if with_acts and self.check_finite and "norm" not in filter_cols else []
        columns = filter_cols + check + (["act"] if with_acts else [])
        table = self._file(f).read_row_group(rg, columns=columns, use_threads=False) if columns else None
        if rows is None:
            keep = self.row_filter.mask(table) if filter_cols else None
            rows = np.arange(n, dtype=np.int64) if keep is None else np.flatnonzero(keep)
        words = None
        if with_acts and self.check_finite:
            self._check_finite(table.column("norm").to_numpy()[rows], f, rg, rows)
        if with_acts:
            words = decode_acts(table.column("act"), self.d_model, self.store_dtype).view(self._word)
            # copy here, on the worker thread: this is where the mapped pages are faulted in and
            # read, so the main thread's buffer fill reads from hot memory
            words = torch.index_select(words, 0, torch.from_numpy(rows)) if len(rows) != n else words.clone()
        return _Loaded(g, rows, words)

    # -- iteration ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        C, B = self.buffer_tokens, self.batch_size
        words = self.row_bytes // torch.empty((), dtype=self._word).element_size()
        self._buf = torch.empty((C, words), dtype=self._word)  # raw vectors, gathered as wide ints
        self._ids = torch.full((C,), -1, dtype=torch.int64)  # global row id held by each slot
        pin = self.device.type == "cuda"
        self._batch = torch.empty((B, words), dtype=self._word, pin_memory=pin)
        self._live = self.start_batch == 0  # False while replaying towards start_batch
        gen = torch.Generator().manual_seed(self.seed)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="activation-reader")
        try:
            yield from self._batches(gen)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _batches(self, gen: torch.Generator) -> Iterator[torch.Tensor]:
        B = self.batch_size
        count, epoch = 0, 0
        while self.epochs is None or epoch < self.epochs:
            emitted = 0
            for slots in self._epoch_batches(epoch, gen):
                count += 1
                emitted += 1
                if count == self.start_batch and not self._live:
                    self._go_live()
                    continue
                if self._live:
                    self.batches_yielded = count
                    yield self._gather(slots)
            if emitted == 0:
                raise UserError(f"the row filter leaves fewer than batch_size={B} rows: relax it or lower batch_size")
            epoch += 1

    def _epoch_batches(self, epoch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
        """Slot indices of each batch of one epoch, filling and refilling the buffer as it goes."""
        C, B = self.buffer_tokens, self.batch_size
        order = _Prefetch(self, np.random.default_rng([self.seed, epoch]).permutation(len(self.groups)).tolist(),
                          self.prefetch_row_groups)
        self._pending: _Loaded | None = None
        self._ids.fill_(-1)
        free = torch.arange(C)
        while True:
            free = self._fill(free, order)
            n_free = len(free)
            exhausted = n_free > 0
            if exhausted:
                held = torch.ones(C, dtype=torch.bool)
                held[free] = False
                filled = held.nonzero().squeeze(1)
            else:
                filled = torch.arange(C)
            perm = filled[torch.randperm(len(filled), generator=gen)]
            k = (len(filled) // B) * B if exhausted else max(B, (C // 2 // B) * B)
            for j in range(0, k, B):
                yield perm[j:j + B]
            if exhausted:
                return
            free = perm[:k].sort().values  # ascending slots: index_copy_ runs ~25% faster

    def _fill(self, free: torch.Tensor, order: _Prefetch) -> torch.Tensor:
        """Move pending rows into the `free` slots; returns the slots still free (data ran out)."""
        at = 0
        while at < len(free):
            if self._pending is None or self._pending.remaining == 0:
                loaded = order.next(self._live)
                if loaded is None:
                    return free[at:]
                self._pending = loaded
                continue
            p = self._pending
            take = min(len(free) - at, p.remaining)
            slots = free[at:at + take]
            rows = p.rows[p.offset:p.offset + take]
            self._ids[slots] = torch.from_numpy(rows + self.group_base[p.group])
            if self._live:
                src = p.words[p.offset:p.offset + take]
                if take > 1 and int(slots[-1]) - int(slots[0]) == take - 1:
                    self._buf[int(slots[0]):int(slots[0]) + take].copy_(src)  # contiguous (first fill)
                else:
                    self._buf.index_copy_(0, slots, src)
            p.offset += take
            at += take
        return free[at:]

    def _go_live(self) -> None:
        """End a replay: load the vectors of every row the buffer and the pending group hold."""
        held = (self._ids >= 0).nonzero().squeeze(1)
        ids = self._ids[held].numpy()
        group_of = np.searchsorted(self.group_base, ids, side="right") - 1
        for g in np.unique(group_of):
            sel = group_of == g
            loaded = self._load(int(g), with_acts=True, rows=ids[sel] - self.group_base[g])
            self._buf.index_copy_(0, held[torch.from_numpy(np.flatnonzero(sel))], loaded.words)
        if self._pending is not None and self._pending.remaining:
            p = self._pending
            rest = self._load(p.group, with_acts=True, rows=p.rows[p.offset:])
            self._pending = _Loaded(p.group, rest.rows, rest.words)
        self._live = True

    def _gather(self, slots: torch.Tensor) -> torch.Tensor:
        """One batch: gather the slots' raw vectors, then convert/move them into a fresh tensor."""
        store = ELEMENT_DTYPES[self.store_dtype][0]
        B, D = len(slots), self.d_model
        if self.device.type == "cpu" and store == self.dtype:
            out = torch.empty((B, D), dtype=self.dtype)
            torch.index_select(self._buf, 0, slots, out=out.view(self._word))  # one pass, no convert
        else:
            torch.index_select(self._buf, 0, slots, out=self._batch)
            acts = self._batch.view(store)
            if self.device.type == "cpu":
                out = torch.empty((B, D), dtype=self.dtype).copy_(acts)
            else:
                out = acts.to(self.device, non_blocking=False).to(self.dtype)
        return out

    def _check_finite(self, norms: np.ndarray, f: int, rg: int, rows: np.ndarray) -> None:
        """Raise UserError naming the shard and row group when a kept row's norm is not finite.

        The float32 `norm` is computed from the model's activation before the cast to the stored
        dtype, so a NaN/inf anywhere in the vector shows in it; the writer refuses float16 casts
        that would overflow. Checking it costs 4 bytes per row instead of a pass over the vectors.
        """
        finite = np.isfinite(norms)
        if not finite.all():
            bad = int(rows[np.flatnonzero(~finite)[0]])
            raise UserError(f"non-finite activation in {self.files[f]} row group {rg} (row {bad}): "
                            "re-create this dataset, or pass check_finite=False to read it anyway")

    def __len__(self) -> int:
        raise TypeError("ActivationReader has no length (it may loop forever); use n_tokens // batch_size")
