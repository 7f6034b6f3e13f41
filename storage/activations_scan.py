"""Read a cached activation dataset in token order, for analyses that need each row's
(seq_id, pos): per-latent statistics, max-activating examples, matching on the same tokens.

`scan_batches` streams row groups in file order (memory-mapped, one row group alive at a time)
and cuts them into batches of at most `batch_tokens` rows; `read_sequences` reads the rows of a
few sequences (row groups are pruned on their seq_id statistics, the shards being written in
seq_id order); `scan_pairs` zips two datasets row by row and refuses any row whose
(seq_id, pos) differ. The shuffling training reader is `sae_transfer.storage.activations_read`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from sae_transfer.errors import UserError
from sae_transfer.storage.activations import ActivationDataset

_SMALL = ("seq_id", "pos", "token_id", "role")


@dataclass
class RowBatch:
    """Consecutive cached rows: ids as int64 tensors, vectors in the stored dtype (CPU)."""

    seq_id_B: torch.Tensor  # int64 sequence index
    pos_B: torch.Tensor  # int64 position within the sequence
    token_id_B: torch.Tensor  # int64 token id
    role_B: torch.Tensor  # uint8 corpus ROLE_CODE
    acts_BD: torch.Tensor  # [B, D] stored dtype; aliases Arrow memory when not re-chunked

    def __len__(self) -> int:
        return int(self.seq_id_B.shape[0])

    def slice(self, start: int, stop: int) -> RowBatch:
        """Rows start..stop-1 (views, no copy)."""
        return RowBatch(*(t[start:stop] for t in (self.seq_id_B, self.pos_B, self.token_id_B, self.role_B, self.acts_BD)))


def _role_codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The dictionary-encoded role column as its int codes (the writer's dictionary is ROLES order)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.indices.to_numpy(zero_copy_only=False).astype(np.uint8)


def _to_batch(table: pa.Table, ds: ActivationDataset) -> RowBatch:
    def ints(name: str) -> torch.Tensor:
        return torch.from_numpy(table.column(name).to_numpy().astype(np.int64))  # copy: Arrow memory is read-only

    return RowBatch(ints("seq_id"), ints("pos"), ints("token_id"), torch.from_numpy(_role_codes(table.column("role"))),
                    ds.acts(table))


def scan_batches(path: str | Path, batch_tokens: int = 8192) -> Iterator[RowBatch]:
    """Every row of the dataset in token order, in batches of at most `batch_tokens` rows.

    Memory: one row group (plus the batch being used); each shard is opened per row group so a
    finished group's mapped pages are released.
    """
    ds = ActivationDataset(path)
    for shard in ds.shards:
        meta = pq.read_metadata(shard)
        for rg in range(meta.num_row_groups):
            table = pq.ParquetFile(shard, metadata=meta, memory_map=True).read_row_group(
                rg, columns=list(_SMALL) + ["act"], use_threads=False)
            batch = _to_batch(table, ds)
            for start in range(0, len(batch), batch_tokens):
                yield batch.slice(start, start + batch_tokens)


def read_sequences(path: str | Path, seq_ids: Sequence[int]) -> RowBatch:
    """All rows of the given sequences, ordered by (seq_id, pos); row groups whose seq_id range
    misses every wanted id are skipped without being read."""
    ds = ActivationDataset(path)
    wanted = pa.array(sorted({int(s) for s in seq_ids}), pa.int64())
    table = pq.read_table([str(s) for s in ds.shards], columns=list(_SMALL) + ["act"],
                          filters=pc.field("seq_id").isin(wanted))
    table = table.sort_by([("seq_id", "ascending"), ("pos", "ascending")])
    return _to_batch(table, ds)


class _Rechunk:
    """Cuts a stream of RowBatches into batches of an exact size (the last may be shorter)."""

    def __init__(self, stream: Iterator[RowBatch]):
        self.stream, self.pending = stream, None

    def take(self, n: int) -> RowBatch | None:
        parts, got = [], 0
        while got < n:
            if self.pending is None or len(self.pending) == 0:
                self.pending = next(self.stream, None)
                if self.pending is None:
                    break
            piece = self.pending.slice(0, n - got)
            self.pending = self.pending.slice(len(piece), len(self.pending))
            parts.append(piece)
            got += len(piece)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return RowBatch(*(torch.cat(ts)
                          for ts in zip(*((p.seq_id_B, p.pos_B, p.token_id_B, p.role_B, p.acts_BD) for p in parts))))


def scan_pairs(path_a: str | Path, path_b: str | Path, batch_tokens: int = 8192) -> Iterator[tuple[RowBatch, RowBatch]]:
    """Row-aligned batches of two datasets cached on the same tokens (e.g. base and chat).

    Raises UserError at the first row whose (seq_id, pos) or token id differ, or when one
    dataset has more rows: a pairing that does not line up is an error, never a silent join.
    """
    a, b = ActivationDataset(path_a), ActivationDataset(path_b)
    if a.n_tokens != b.n_tokens:
        raise UserError(f"{a.path} has {a.n_tokens} tokens but {b.path} has {b.n_tokens}: "
                        "cache both models on the same corpus, split and token budget")
    left, right = _Rechunk(scan_batches(path_a, batch_tokens)), _Rechunk(scan_batches(path_b, batch_tokens))
    while (batch_a := left.take(batch_tokens)) is not None:
        batch_b = right.take(len(batch_a))
        same = ((batch_a.seq_id_B == batch_b.seq_id_B) & (batch_a.pos_B == batch_b.pos_B)
                & (batch_a.token_id_B == batch_b.token_id_B))
        if not bool(same.all()):
            i = int((~same).nonzero()[0])
            raise UserError(
                f"{a.path} and {b.path} are not aligned: row has (seq_id {int(batch_a.seq_id_B[i])}, pos "
                f"{int(batch_a.pos_B[i])}, token {int(batch_a.token_id_B[i])}) vs (seq_id {int(batch_b.seq_id_B[i])}, "
                f"pos {int(batch_b.pos_B[i])}, token {int(batch_b.token_id_B[i])}): cache both models on the same token ids")
        yield batch_a, batch_b


def mean_norm(path: str | Path) -> float:
    """E||x|| over every row (raw model units), from the manifest (or the `norm` column)."""
    ds = ActivationDataset(path)
    value = ds.manifest.get("norm_mean")
    if value is None:
        value = float(np.mean(ds.read_table(columns=["norm"]).column("norm").to_numpy(), dtype=np.float64))
    return float(value)
