"""One activation dataset cached by several workers, each a range of sequences.

`plan_ranges` cuts the sequences (where one writer would close a shard, given the row size);
each worker runs an `ActivationWriter(..., seq_range=SeqRange(start, stop))` beside the others;
`merge_ranges` checks their `_range-<start>.json` records tile the dataset and writes the one
manifest (locally or on an object store). See docs/cache-format.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sae_transfer.storage.activations_write import ROW_OVERHEAD, SeqRange, write_manifest
from sae_transfer.storage.store import RemotePath, location


def merge_ranges(path: str | Path | RemotePath, scale_of: Callable[[float, int], float] | None = None) -> dict:
    """Write the one manifest of a dataset its range writers finished; returns it.

    Raises RuntimeError unless the recorded ranges are of one dataset and tile its sequences
    from 0 with exactly n_tokens rows (a missing, doubled or overlapping range writes nothing).
    On an object store it reads the range records published there and writes the manifest there.
    """
    path = location(path)
    ranges = sorted((json.loads(f.read_text()) for f in path.glob("_range-*.json")), key=lambda r: r["start"])
    if not ranges:
        raise RuntimeError(f"{path}: no finished range to merge")
    meta, at = ranges[0]["meta"], 0
    for r in ranges:
        if r["meta"].get("dataset_key") != meta.get("dataset_key") or r["row_bytes"] != ranges[0]["row_bytes"]:
            raise RuntimeError(f"{path}: range {r['start']}..{r['stop']} belongs to another dataset")
        if r["start"] != at:
            raise RuntimeError(f"{path}: sequences {at}..{r['start']} are missing or doubled (a range still running, "
                               "or one of an earlier split with other cuts: then delete the folder and cache again)")
        at = r["stop"]
    shards = [s for r in ranges for s in r["shards"]]
    if sum(s["rows"] for s in shards) != int(meta["n_tokens"]):
        raise RuntimeError(f"{path}: ranges hold {sum(s['rows'] for s in shards)} rows, n_tokens={meta['n_tokens']}")
    rg_rows = {r["row_group_rows"] for r in ranges}
    manifest = write_manifest(path, meta, shards, ranges[0]["row_bytes"], max(rg_rows), scale_of)
    for r in ranges:
        (path / f"_range-{SeqRange(r['start'], r['stop']).tag}.json").unlink(missing_ok=True)
    return manifest


def plan_ranges(n_tokens: int, context_size: int, batch_tokens: int, workers: int,
                shard_bytes: int | None = None, row_bytes: int | None = None) -> list[SeqRange]:
    """Split a dataset's sequences into at most `workers` contiguous ranges of similar size.

    Cuts fall on whole forward batches (`batch_tokens // context_size` sequences, the writer's
    append unit); given `shard_bytes` and `row_bytes` they fall where a single writer closes a
    shard, so each range's shards hold exactly the single writer's rows and row groups."""
    S = context_size
    n_seqs = -(-n_tokens // S)
    batch = max(1, batch_tokens // S)
    cuts = list(range(batch, n_seqs, batch))  # possible cut points: batch ends
    if shard_bytes is not None and row_bytes is not None:
        cuts, rows = [], 0
        for s0 in range(0, n_seqs, batch):
            end = min(s0 + batch, n_seqs)
            rows += min(end * S, n_tokens) - s0 * S
            if rows * (row_bytes + ROW_OVERHEAD) >= shard_bytes and end < n_seqs:
                cuts.append(end)
                rows = 0
    chosen, target = [], [n_seqs * k / workers for k in range(1, workers)]
    for goal in target:  # the possible cut nearest each even share, increasing
        best = min((c for c in cuts if not chosen or c > chosen[-1]), key=lambda c: abs(c - goal), default=None)
        if best is not None and best not in chosen:
            chosen.append(best)
    bounds = [0, *chosen, n_seqs]
    return [SeqRange(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
