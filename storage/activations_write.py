"""Write one activation dataset: bounded shards, atomic renames, a progress log, manifest last.

Crash safety: a shard is written as `.shard-NNNNN.parquet.tmp`, fsynced, renamed to
`shard-NNNNN.parquet`, and only then recorded in `_progress.jsonl`. The fsync, rename, sha256
and progress line of a closed shard run on the writer's finalising thread (in shard order)
while the next shard is encoded; `finish` waits for them before the manifest. Shards end on sequence
boundaries, so a new writer on the same folder keeps the recorded shards, deletes anything else,
and asks for sequences from `next_seq` on. `_manifest.json` is written (atomically) after the
last shard; readers trust nothing else. Every name but the shards' starts with `_` or `.`, so
pyarrow and pandas open the folder as a plain Parquet dataset.

Split over workers: several writers may fill one dataset, each a `SeqRange` of sequences
(`ActivationWriter(..., seq_range=...)`), each with its own progress log
(`_progress-<first seq>.jsonl`) and, when done, its own `_range-<first seq>.json`; no writer
touches another's files. `merge_ranges` (`sae_transfer.storage.activations_ranges`) then checks
the ranges tile the dataset and writes the one manifest. A range's shards are named
`shard-<tag>-NNNNN.parquet`; ranges cut where a single writer would close a shard
(`plan_ranges`) hold exactly the rows and row groups of the single writer's shards, so the
merged dataset reads identically (row by row, group by group).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sae_transfer.storage.activations import (
    ELEMENT_DTYPES,
    FORMAT_VERSION,
    LEGACY_MANIFEST,
    MANIFEST,
    PROGRESS,
    activation_schema,
    role_dictionary,
)
from sae_transfer.storage.fingerprint import sha256_file
from sae_transfer.storage.store import RemotePath

log = logging.getLogger(__name__)

ROW_OVERHEAD = 21  # bytes per row outside `act` (seq_id, pos, token_id, role, norm), uncompressed


@dataclass(frozen=True)
class WriterConfig:
    """How an activation dataset is cut into files."""

    shard_bytes: int = 128 << 20  # close a shard once it holds this many bytes (at a sequence boundary)
    row_group_rows: int | None = None  # rows per row group; None: ~16 MiB of act, clamped to 1024..16384
    checksum: bool = True  # record each shard's sha256 in the manifest (re-reads the file from page cache)

    def rows_per_group(self, row_bytes: int) -> int:
        """Row-group length for vectors of `row_bytes` bytes."""
        if self.row_group_rows is not None:
            return self.row_group_rows
        return int(min(16384, max(1024, (16 << 20) // row_bytes)))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SeqRange:
    """The sequences [start, stop) one writer of a split dataset writes."""

    start: int
    stop: int

    @property
    def tag(self) -> str:
        """Names this range's own files: `_progress-<tag>.jsonl`, `_range-<tag>.json`."""
        return f"{self.start:09d}"


def range_rows(meta: dict, seqs: SeqRange) -> int:
    """Rows of sequences [start, stop) in a dataset of meta's n_tokens and context_size (the
    last sequence is cut so the dataset ends at n_tokens)."""
    S, n = int(meta["context_size"]), int(meta["n_tokens"])
    return max(0, min(seqs.stop * S, n) - seqs.start * S)


def _write_json_durably(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_manifest(path: Path | RemotePath, meta: dict, shards: list[dict], row_bytes: int, rg_rows: int,
                    scale_of: Callable[[float, int], float] | None) -> dict:
    """Write `_manifest.json` (last: it makes the dataset complete); returns it."""
    rows = sum(s["rows"] for s in shards)
    norm_mean = sum(s["norm_sum"] for s in shards) / max(1, rows)
    manifest = {
        "format_version": FORMAT_VERSION,
        "n_tokens": rows,
        # E||x|| over all rows and the scale s = sqrt(d_model) / E||x|| (see DESIGN: scaling)
        "norm_mean": norm_mean,
        "scale_factor": scale_of(norm_mean, int(meta["d_model"]))
        if scale_of is not None and math.isfinite(norm_mean) and norm_mean > 0 else None,
        "row_bytes": row_bytes,
        "row_group_rows": rg_rows,
        "meta": meta,
        "shards": [{k: v for k, v in s.items() if k != "key"} for s in shards],
    }
    if isinstance(path, RemotePath):
        (path / MANIFEST).write_bytes(json.dumps(manifest, indent=1).encode())  # one whole object
    else:
        _write_json_durably(path / MANIFEST, manifest)
        (path / LEGACY_MANIFEST).unlink(missing_ok=True)
    return manifest


class ActivationWriter:
    """Appends token rows to a dataset folder; resumes from the shards a killed run completed.

    `meta` must hold at least `d_model`, `dtype` and `n_tokens` (the total the finished
    dataset has); it is stored in every shard's key-value metadata and in the manifest.
    With `seq_range`, the writer fills only those sequences, beside other writers' ranges, and
    `finish` records the range (`_range-<tag>.json`) instead of writing the manifest.
    """

    def __init__(self, path: str | Path, meta: dict, cfg: WriterConfig = WriterConfig(),
                 seq_range: SeqRange | None = None):
        self.path = Path(path)
        self.seq_range = seq_range
        self._progress = self.path / (PROGRESS if seq_range is None else f"_progress-{seq_range.tag}.jsonl")
        self.meta = dict(meta, format_version=FORMAT_VERSION)
        self.cfg = cfg
        self.d_model = int(meta["d_model"])
        self.row_bytes = self.d_model * ELEMENT_DTYPES[meta["dtype"]][1]
        self.rg_rows = cfg.rows_per_group(self.row_bytes)
        self.schema = activation_schema(self.d_model, meta["dtype"], self.meta)
        self.path.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = self._recover()
        first = seq_range.start if seq_range else 0
        self.next_seq: int = self.shards[-1]["end_seq"] if self.shards else first  # first seq not yet safe
        self.rows_done: int = sum(s["rows"] for s in self.shards)  # rows in complete shards
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._shard_rows = 0
        self._shard_norm_sum = 0.0  # float64 sum of `norm` over the open shard's rows
        self._shard_first_seq = self.next_seq
        self._last_seq = self.next_seq - 1
        self._shard_prefix = "" if seq_range is None else f"{seq_range.tag}-"  # keeps ranges' names apart
        self._shard_index = len(self.shards)  # number of the open shard
        self._finalizer: ThreadPoolExecutor | None = None  # one thread: shards finalise in order
        self._finalizing: list[Future] = []

    # -- resume -------------------------------------------------------------------------
    def _recover(self) -> list[dict]:
        """Shards a previous run completed (recorded and intact); delete every other shard file."""
        kept: list[dict] = []
        progress = self._progress
        if progress.is_file():
            for line in progress.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    break
                file = self.path / entry["file"]
                if entry.get("key") != self.meta.get("dataset_key") or not file.is_file() \
                        or file.stat().st_size != entry["bytes"]:
                    break
                kept.append(entry)
        keep_names = {e["file"] for e in kept}
        for name in (MANIFEST, LEGACY_MANIFEST):  # describes shards about to be rewritten
            (self.path / name).unlink(missing_ok=True)
        if self.seq_range is None:
            stale = list(self.path.glob("shard-*.parquet")) + list(self.path.glob(".*.tmp"))
        else:  # only this range's shards: the other ranges' writers may be running
            tag = self.seq_range.tag
            stale = list(self.path.glob(f"shard-{tag}-*.parquet")) + list(self.path.glob(f".shard-{tag}-*.tmp"))
            (self.path / f"_range-{tag}.json").unlink(missing_ok=True)
        for file in stale:
            if file.name not in keep_names:
                file.unlink(missing_ok=True)
        self._rewrite_progress(kept)
        if kept:
            log.info("resuming %s: %d complete shards, %d rows", self.path, len(kept), sum(e["rows"] for e in kept))
        return kept

    def _rewrite_progress(self, entries: list[dict]) -> None:
        tmp = self._progress.with_name(f".{self._progress.name}.tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
        os.replace(tmp, self._progress)

    # -- appending ----------------------------------------------------------------------
    def append(self, seq_id: np.ndarray, pos: np.ndarray, token_id: np.ndarray, role: np.ndarray,
               norm: np.ndarray, act: np.ndarray) -> None:
        """Add rows (whole sequences, in seq_id order); rows of already-saved sequences are skipped.

        `act` is a C-contiguous uint8 array [n, d_model * itemsize] of little-endian vectors;
        `role` holds ROLE_CODE values. The arrays are referenced, not copied, until written.
        """
        if len(seq_id) and seq_id[-1] < self.next_seq:
            return
        if len(seq_id) and seq_id[0] < self.next_seq:
            start = int(np.searchsorted(seq_id, self.next_seq))
            seq_id, pos, token_id, role, norm, act = (a[start:] for a in (seq_id, pos, token_id, role, norm, act))
        n = len(seq_id)
        if n == 0:
            return
        assert act.shape == (n, self.row_bytes) and act.dtype == np.uint8 and act.flags.c_contiguous
        assert seq_id[0] > self._last_seq, "append whole sequences in increasing seq_id order"
        batch = pa.RecordBatch.from_arrays([
            pa.array(seq_id.astype(np.int64, copy=False)),
            pa.array(pos.astype(np.int32, copy=False)),
            pa.array(token_id.astype(np.int32, copy=False)),
            pa.DictionaryArray.from_arrays(pa.array(role.astype(np.int8, copy=False)), role_dictionary()),
            pa.array(norm.astype(np.float32, copy=False)),
            pa.FixedSizeBinaryArray.from_buffers(pa.binary(self.row_bytes), n, [None, pa.py_buffer(act)]),
        ], schema=self.schema)
        self._pending.append(batch)
        self._pending_rows += n
        self._shard_rows += n
        self._shard_norm_sum += float(norm.sum(dtype=np.float64))
        self._last_seq = int(seq_id[-1])
        if self._pending_rows >= self.rg_rows:
            self._flush(whole_groups_only=True)
        if self._shard_rows * (self.row_bytes + ROW_OVERHEAD) >= self.cfg.shard_bytes:
            self._close_shard()

    def _tmp_name(self) -> Path:
        return self.path / f".shard-{self._shard_prefix}{self._shard_index:05d}.parquet.tmp"

    def _flush(self, whole_groups_only: bool) -> None:
        """Write pending rows as row groups of `rg_rows` (all of them unless `whole_groups_only`)."""
        if not self._pending_rows:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        n_write = (self._pending_rows // self.rg_rows) * self.rg_rows if whole_groups_only else self._pending_rows
        if n_write == 0:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self._tmp_name(), self.schema,
                compression={c: ("NONE" if c == "act" else "ZSTD") for c in self.schema.names},
                use_dictionary=["role"],
                write_statistics=["seq_id", "pos", "token_id", "role", "norm"],
                data_page_size=4 << 20,
            )
        self._writer.write_table(table.slice(0, n_write), row_group_size=self.rg_rows)
        rest = table.slice(n_write)
        self._pending = rest.to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def _close_shard(self) -> None:
        """Close the current shard file and hand it to the finalising thread (fsync, rename,
        checksum, progress line); at most two shards wait there, so a crash loses little."""
        self._flush(whole_groups_only=False)
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        entry = {
            "file": f"shard-{self._shard_prefix}{self._shard_index:05d}.parquet", "rows": self._shard_rows,
            "first_seq": self._shard_first_seq, "end_seq": self._last_seq + 1,
            "norm_sum": self._shard_norm_sum, "key": self.meta.get("dataset_key"),
        }
        if self._finalizer is None:
            self._finalizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-finalize")
        self._finalizing.append(self._finalizer.submit(self._finalize, self._tmp_name(), entry))
        self._shard_index += 1
        self._shard_first_seq = entry["end_seq"]
        self._shard_rows = 0
        self._shard_norm_sum = 0.0
        while len(self._finalizing) > 2 or (self._finalizing and self._finalizing[0].done()):
            self._finalizing.pop(0).result()  # re-raises a failed finalisation here

    def _finalize(self, tmp: Path, entry: dict) -> None:
        """Make a closed shard durable and recorded: fsync, rename, sha256, progress line."""
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        final = self.path / entry["file"]
        os.replace(tmp, final)
        _fsync_dir(self.path)
        entry = dict(entry, bytes=final.stat().st_size, sha256=sha256_file(final) if self.cfg.checksum else None)
        with open(self._progress, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.shards.append(entry)
        self.rows_done += entry["rows"]
        self.next_seq = entry["end_seq"]
        log.debug("wrote %s (%d rows)", final, entry["rows"])

    def _drain(self) -> None:
        """Wait for every closed shard to be finalised; re-raise the first failure."""
        try:
            for future in self._finalizing:
                future.result()
        finally:
            self._finalizing = []
            if self._finalizer is not None:
                self._finalizer.shutdown(wait=True)
                self._finalizer = None

    def finish(self, scale_of: Callable[[float, int], float] | None = None) -> dict:
        """Close the last shard and write the manifest; returns the manifest dict. A range writer
        records its range (`_range-<tag>.json`, returned) instead: `merge_ranges` writes the manifest.

        `scale_of(norm_mean, d_model)` gives the dataset's activation scale factor (the science
        owns the formula: sae_transfer.sae.scaling.scale_factor); the manifest records it, or
        None when it is not given or the mean norm is not a positive number."""
        self._close_shard()
        self._drain()
        want = int(self.meta["n_tokens"]) if self.seq_range is None else range_rows(self.meta, self.seq_range)
        if self.rows_done != want:
            raise RuntimeError(f"{self.path}: wrote {self.rows_done} rows, expected {want}")
        if self.seq_range is not None:
            record = {"start": self.seq_range.start, "stop": self.seq_range.stop, "rows": self.rows_done,
                      "meta": self.meta, "row_bytes": self.row_bytes, "row_group_rows": self.rg_rows,
                      "shards": self.shards}
            _write_json_durably(self.path / f"_range-{self.seq_range.tag}.json", record)
            self._progress.unlink(missing_ok=True)
            return record
        manifest = write_manifest(self.path, self.meta, self.shards, self.row_bytes, self.rg_rows, scale_of)
        self._progress.unlink(missing_ok=True)
        return manifest

    def abort(self) -> None:
        """Drop the open temp shard; shards already closed are still finalised, so they stay
        for a later resume."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._tmp_name().unlink(missing_ok=True)
        try:
            self._drain()
        except Exception as exc:  # the caller is already handling the error that made it abort
            log.warning("finalising a shard of %s failed while aborting: %s", self.path, exc)
