"""Base and chat activation caches paired row by row, streamed as [B, 2D] batches.

A pairing is only valid when both caches hold the same tokens in the same order: same hook,
width, corpus (fingerprint, split, context size, BOS rule), row count, and equal
`(seq_id, pos, token_id)` on every row. `open_pair` checks all of it (the token check reads
only the small columns) and raises a one-line UserError at the first difference; nothing is
ever joined silently.

Each model is scaled by its own factor s_m = sqrt(d_model) / E‖x_m‖ (`sae.scaling`, E‖x‖
over the whole cache as recorded in its manifest), so a batch row is
[s_base·x_base, s_chat·x_chat].

`PairedSource` streams shuffled batches with memory bounded by `buffer_tokens` rows: per
epoch the base cache's row groups are permuted (seed, epoch), taken `buffer_tokens` rows at a
time, read from both caches, and emitted as random batches of that group (a last partial batch
of a group is dropped). Batch n of the stream depends only on (seed, n), so `start_batch=n`
resumes exactly; skipping to it reads no vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae_transfer.errors import UserError
from sae_transfer.sae.scaling import scale_factor
from sae_transfer.storage.activations import ActivationDataset, decode_acts
from sae_transfer.storage.activations_scan import mean_norm

# metadata that must agree for two caches to hold the same tokens (beyond hook and width)
CORPUS_KEYS = ("corpus_fingerprint", "split", "context_size", "prepend_bos")
ROW_KEYS = ("seq_id", "pos", "token_id")


@dataclass(frozen=True)
class PairedCaches:
    """Two aligned caches (checked by `open_pair`) and each model's scale factor."""

    base: Path  # base model's activation dataset folder
    chat: Path  # chat model's activation dataset folder
    hook: str  # the hook both were cached at
    d_model: int  # width of one model's activation
    n_tokens: int  # rows in each cache
    scale_base: float  # s_base (dimensionless): scaled base acts have mean norm sqrt(d_model)
    scale_chat: float  # s_chat, the same for the chat cache
    meta: dict  # provenance: both caches' model ids/revisions, corpus fingerprint, context size

    def datasets(self) -> tuple[ActivationDataset, ActivationDataset]:
        """(base, chat) ActivationDataset objects."""
        return ActivationDataset(self.base), ActivationDataset(self.chat)


@dataclass
class PairedRows:
    """Consecutive paired rows (unshuffled), scaled per model."""

    x_BMD: torch.Tensor  # [B, 2, D] float32: [:, 0] base, [:, 1] chat, each × its scale factor
    seq_id_B: torch.Tensor  # int64
    pos_B: torch.Tensor  # int64
    token_id_B: torch.Tensor  # int64
    row_B: torch.Tensor  # int64 global row index in the caches


def open_pair(base: str | Path, chat: str | Path, verify_tokens: bool = True) -> PairedCaches:
    """Check that two caches can be paired and return them with their scale factors.

    Raises UserError naming both folders and the first thing that differs."""
    b, c = ActivationDataset(base), ActivationDataset(chat)
    where = f"base cache {b.path} and chat cache {c.path}"
    if b.hook != c.hook:
        raise UserError(f"{where} hold different hooks ({b.hook!r} vs {c.hook!r}): cache both models at the same hook")
    if b.d_model != c.d_model:
        raise UserError(f"{where} have widths {b.d_model} and {c.d_model}: a crosscoder pairs models of one d_model")
    for key in CORPUS_KEYS:
        if b.meta.get(key) != c.meta.get(key):
            raise UserError(f"{where} come from different corpora ({key} {b.meta.get(key)!r} vs {c.meta.get(key)!r}): "
                            "cache both models on the same corpus and settings")
    if b.n_tokens != c.n_tokens:
        raise UserError(f"{where} hold {b.n_tokens} and {c.n_tokens} rows: cache both with the same --tokens")
    if verify_tokens:
        _check_rows(b, c)
    meta = {
        "hook": b.hook, "d_model": b.d_model, "n_tokens": b.n_tokens,
        **{key: b.meta.get(key) for key in CORPUS_KEYS},
        "base_model": b.meta.get("model_id"), "base_revision": b.meta.get("model_revision"),
        "chat_model": c.meta.get("model_id"), "chat_revision": c.meta.get("model_revision"),
        "base_cache": str(b.path), "chat_cache": str(c.path),
    }
    return PairedCaches(b.path, c.path, b.hook, b.d_model, b.n_tokens, _scale(b), _scale(c), meta)


def _scale(ds: ActivationDataset) -> float:
    """s = sqrt(D) / E||x|| of a cache (E||x|| from `activations_scan.mean_norm`, its one reader)."""
    return scale_factor(mean_norm(ds.path), ds.d_model)


def _check_rows(b: ActivationDataset, c: ActivationDataset) -> None:
    """UserError at the first row whose (seq_id, pos, token_id) differ between the caches."""
    rb, rc = _Rows(b), _Rows(c)
    for start, stop in rb.group_ranges():
        tb, tc = rb.read(start, stop, list(ROW_KEYS)), rc.read(start, stop, list(ROW_KEYS))
        for key in ROW_KEYS:
            xb, xc = tb.column(key).to_numpy(), tc.column(key).to_numpy()
            bad = np.flatnonzero(xb != xc)
            if bad.size:
                i = int(bad[0])
                raise UserError(
                    f"base cache {b.path} and chat cache {c.path} differ at row {start + i} "
                    f"(seq {tb.column('seq_id')[i]}, pos {tb.column('pos')[i]}): {key} {xb[i]} vs {xc[i]}; "
                    "cache both models on the same token ids (same corpus and tokenizer)"
                )


class _Rows:
    """Read a global row range [start, stop) of a dataset, whatever its shard / row-group cuts."""

    def __init__(self, ds: ActivationDataset):
        self.ds = ds
        self.footers = [pq.read_metadata(s) for s in ds.shards]
        groups = [(f, g, meta.row_group(g).num_rows) for f, meta in enumerate(self.footers)
                  for g in range(meta.num_row_groups)]
        self.groups = np.array(groups, dtype=np.int64).reshape(-1, 3)
        self.starts = np.concatenate([[0], np.cumsum(self.groups[:, 2])])

    def group_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) of every row group, in row order."""
        return [(int(a), int(b)) for a, b in zip(self.starts[:-1], self.starts[1:])]

    def read(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        """Rows [start, stop) as one table of `columns`."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        g = first
        while g < len(self.groups) and self.starts[g] < stop:
            f, rg, _ = (int(x) for x in self.groups[g])
            file = pq.ParquetFile(self.ds.shards[f], metadata=self.footers[f], memory_map=True)
            table = file.read_row_group(rg, columns=columns, use_threads=False)
            lo = max(start, int(self.starts[g])) - int(self.starts[g])
            hi = min(stop, int(self.starts[g + 1])) - int(self.starts[g])
            pieces.append(table.slice(lo, hi - lo))
            g += 1
        return pa.concat_tables(pieces).combine_chunks()

    def acts(self, table: pa.Table) -> torch.Tensor:
        """The act column as float32 [n, D] (copied), after a finiteness check of `norm`."""
        if not np.isfinite(table.column("norm").to_numpy()).all():
            raise UserError(f"non-finite activation in {self.ds.path}: re-create this cache")
        return decode_acts(table.column("act"), self.ds.d_model, self.ds.dtype).float()


def read_paired(pair: PairedCaches, start: int, stop: int, with_rows: bool = False) -> PairedRows:
    """Rows [start, stop) of both caches, scaled per model (the caller keeps the range small)."""
    b, c = pair.datasets()
    cols = ["norm", "act"] + (list(ROW_KEYS) if with_rows else [])
    rb, rc = _Rows(b), _Rows(c)
    tb, tc = rb.read(start, stop, cols), rc.read(start, stop, ["norm", "act"])
    x_BMD = torch.stack([rb.acts(tb) * pair.scale_base, rc.acts(tc) * pair.scale_chat], dim=1)
    n = stop - start
    ids = {k: torch.from_numpy(tb.column(k).to_numpy().astype(np.int64)) if with_rows else torch.zeros(n, dtype=torch.int64)
           for k in ROW_KEYS}
    return PairedRows(x_BMD, ids["seq_id"], ids["pos"], ids["token_id"], torch.arange(start, stop))


def iter_paired(pair: PairedCaches, batch_size: int, max_rows: int | None = None) -> Iterator[PairedRows]:
    """Consecutive paired rows in cache order, `batch_size` at a time (the last may be shorter),
    with seq_id / pos / token_id; stops after `max_rows` rows when given."""
    stop_all = pair.n_tokens if max_rows is None else min(max_rows, pair.n_tokens)
    for start in range(0, stop_all, batch_size):
        yield read_paired(pair, start, min(start + batch_size, stop_all), with_rows=True)


class PairedSource:
    """Shuffled [B, 2D] batches (base half, chat half; each scaled) for the training loop.

    Iterating yields batch `start_batch`, `start_batch + 1`, ...; `epochs=None` loops forever."""

    def __init__(self, pair: PairedCaches, batch_size: int, seed: int = 0, buffer_tokens: int = 65_536,
                 start_batch: int = 0, epochs: int | None = None, device: str | torch.device = "cpu"):
        if pair.n_tokens < batch_size:
            raise UserError(f"the paired caches hold {pair.n_tokens} rows, less than one batch ({batch_size}): "
                            "lower the batch size")
        self.pair, self.batch_size, self.seed = pair, batch_size, seed
        self.buffer_tokens = max(buffer_tokens, batch_size)
        self.start_batch, self.epochs, self.device = start_batch, epochs, torch.device(device)
        self.ranges = _Rows(ActivationDataset(pair.base)).group_ranges()

    def _groups(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The epoch's row-group ranges, shuffled and packed into buffers of ~buffer_tokens rows."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.ranges))
        groups, current, rows = [], [], 0
        for i in order:
            a, b = self.ranges[int(i)]
            current.append((a, b))
            rows += b - a
            if rows >= self.buffer_tokens:
                groups.append(current)
                current, rows = [], 0
        return groups + ([current] if current else [])

    def __iter__(self) -> Iterator[torch.Tensor]:
        B, skip, epoch = self.batch_size, self.start_batch, 0
        produced_any = False
        while self.epochs is None or epoch < self.epochs:
            for g, group in enumerate(self._groups(epoch)):
                n_rows = sum(b - a for a, b in group)
                n_batches = n_rows // B
                if skip >= n_batches:  # resuming: this whole group was consumed already
                    skip -= n_batches
                    continue
                x_NMD = torch.cat([read_paired(self.pair, a, b).x_BMD for a, b in group])
                perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + g))
                for j in range(skip, n_batches):
                    produced_any = True
                    yield x_NMD.index_select(0, perm[j * B:(j + 1) * B]).flatten(1).to(self.device)
                skip = 0
            if not produced_any and skip == 0:
                raise UserError(f"no buffer of the paired caches holds a full batch of {B} rows: lower the batch size")
            epoch += 1


def paired_factory(pair: PairedCaches, batch_size: int, seed: int = 0, buffer_tokens: int = 65_536,
                   device: str | torch.device = "cpu"):
    """start_batch -> PairedSource: the SourceFactory the training loop resumes from."""
    return lambda start_batch: PairedSource(pair, batch_size, seed, buffer_tokens, start_batch, device=device)


def iter_paired_raw(pair: PairedCaches, max_rows: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """(token_id_B, role_B, pos_B, base_BD, chat_BD) one base row group at a time, in cache order
    and raw model units (no scale factor), for analyses of x_chat − x_base; stops after max_rows."""
    b, c = pair.datasets()
    rb, rc = _Rows(b), _Rows(c)
    stop_all = pair.n_tokens if max_rows is None else min(max_rows, pair.n_tokens)
    for start, stop in rb.group_ranges():
        if start >= stop_all:
            return
        stop = min(stop, stop_all)
        tb = rb.read(start, stop, ["token_id", "role", "pos", "norm", "act"])
        tc = rc.read(start, stop, ["norm", "act"])
        yield (torch.from_numpy(tb.column("token_id").to_numpy().astype(np.int64)),
               # the role column is dictionary-encoded in ROLES order: its indices are the role codes
               torch.from_numpy(tb.column("role").combine_chunks().indices.to_numpy(zero_copy_only=False).astype(np.int64)),
               torch.from_numpy(tb.column("pos").to_numpy().astype(np.int64)), rb.acts(tb), rc.acts(tc))
