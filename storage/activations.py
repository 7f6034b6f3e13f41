"""The Parquet activation cache: row schema, dataset naming, manifest and `ActivationDataset`.

One dataset folder per (model, hook, corpus, token budget, ...), named by a readable slug plus
a hash of everything that determines its content. Inside:

    shard-00000.parquet ...   complete shards (written as `.shard-*.tmp`, then renamed)
    _progress.jsonl           one line per renamed shard while a run is in flight (resume)
    _manifest.json            written last; a reader trusts only the shards it lists

Names starting with `_` or `.` are skipped by pyarrow (as Spark's `_SUCCESS`), so the folder
opens as it is with `pyarrow.dataset.dataset(folder)` or `pandas.read_parquet(folder)`.
Folders written before the manifest was renamed (`manifest.json`) still read here.

One row per token: `seq_id, pos, token_id, role, norm, act`. `act` is a
`fixed_size_binary(d_model * itemsize)` column holding the raw little-endian vector, so a row
group decodes zero-copy with `np.frombuffer(col.buffers()[1], ...)`; a fixed-size list column
holding the same numbers reads 10-20x slower (see bench/bench_cache.py).

The writer is in `sae_transfer.storage.activations_write`, the shuffling batch reader in
`sae_transfer.storage.activations_read`.

On an object store (`s3://...` roots) a dataset is written in this machine's mirror of its
folder and published object by object, the manifest last (`publish_dataset`); opening it fetches
the shards the manifest lists into the mirror once, by ETag (`ActivationDataset`), so every
reader keeps working on memory-mapped local files.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae_transfer.errors import UserError
from sae_transfer.storage.fingerprint import sha256_file
from sae_transfer.storage.mirror import fetch, mirror_dir, publish
from sae_transfer.storage.store import RemotePath, location

FORMAT_VERSION = 1  # bump when the row layout or metadata keys change; part of every dataset hash
MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"  # the name before pyarrow-readable folders; read, never written
PROGRESS = "_progress.jsonl"

ELEMENT_DTYPES = {  # element dtype name -> (torch dtype, bytes per element)
    "float32": (torch.float32, 4),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
}
_NUMPY_VIEW = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 via int16

# Everything that decides a dataset's rows; hashed into its folder name.
KEY_FIELDS = (
    "model_id", "model_revision", "hook", "corpus_fingerprint", "split", "n_tokens",
    "context_size", "dtype", "model_dtype", "prepend_bos", "format_version",
)

# Token roles, in code order: a role is stored as its index here (uint8 in memory, a
# dictionary-encoded string in Parquet); sae_transfer.corpus assigns them.
ROLES = ("bos", "text", "user", "assistant", "template")
ROLE_TYPE = pa.dictionary(pa.int8(), pa.string())


def activation_schema(d_model: int, dtype: str, metadata: dict | None = None) -> pa.Schema:
    """The row schema of an activation shard, with `metadata` (JSON-encoded values) attached."""
    if dtype not in ELEMENT_DTYPES:
        raise UserError(f"unknown activation dtype {dtype!r}: use one of {', '.join(ELEMENT_DTYPES)}")
    schema = pa.schema([
        pa.field("seq_id", pa.int64(), nullable=False),  # index of the sequence in the token order
        pa.field("pos", pa.int32(), nullable=False),  # position within the sequence (0 = BOS if prepended)
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("role", ROLE_TYPE, nullable=False),  # bos / text / user / assistant / template
        pa.field("norm", pa.float32(), nullable=False),  # raw L2 norm of the activation, model units
        pa.field("act", pa.binary(d_model * ELEMENT_DTYPES[dtype][1]), nullable=False),  # raw LE vector
    ])
    if metadata:
        schema = schema.with_metadata({k: json.dumps(v) for k, v in metadata.items()})
    return schema


def role_dictionary() -> pa.Array:
    """The role strings, in ROLES code order: role column indices are `ROLE_CODE` values."""
    return pa.array(ROLES, pa.string())


def dataset_key(meta: dict) -> str:
    """sha256 (hex, 16 chars) of the fields in KEY_FIELDS: equal keys mean equal rows."""
    missing = [k for k in KEY_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"dataset metadata lacks {missing}: pass every field of KEY_FIELDS")
    payload = json.dumps({k: meta[k] for k in KEY_FIELDS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _human_tokens(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size and n % (size // 1000 or 1) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def dataset_dirname(meta: dict) -> str:
    """Readable, content-addressed folder name: `<model>__<hook>__<split>-<tokens>__<key>`."""
    model = Path(str(meta["model_id"]).rstrip("/")).name or "model"
    slug = f"{model}__{meta['hook']}__{meta['split']}-{_human_tokens(int(meta['n_tokens']))}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", slug) + "__" + dataset_key(meta)


def dataset_dir(root: str | Path | RemotePath, meta: dict) -> Path | RemotePath:
    """The folder under `root` (a local folder or an object-store prefix) that holds (or will
    hold) the dataset described by `meta`."""
    return location(root) / dataset_dirname(meta)


def staging_dir(path: str | Path | RemotePath) -> Path:
    """The local folder a writer fills for dataset `path`: the folder itself, or this machine's
    mirror of a remote one (then `publish_dataset` sends it)."""
    path = location(path)
    return mirror_dir(path) if isinstance(path, RemotePath) else path


def publish_dataset(local: Path, remote: str | Path | RemotePath, *, tag: str | None = None) -> None:
    """Send a finished dataset (or, with `tag`, one range writer's shards and `_range-<tag>.json`)
    from its staging folder to `remote`, the manifest (or range record) last. Nothing for a local
    dataset, written in place."""
    remote = location(remote)
    if not isinstance(remote, RemotePath):
        return
    if tag is None:
        names = [s["file"] for s in json.loads((local / MANIFEST).read_text())["shards"]]
        publish(local, remote, names + [MANIFEST], last=[MANIFEST])
    else:
        record = f"_range-{tag}.json"
        names = [s["file"] for s in json.loads((local / record).read_text())["shards"]]
        publish(local, remote, names + [record], last=[record])


def read_manifest(path: str | Path | RemotePath) -> dict | None:
    """The dataset's manifest, or None when the folder holds no complete dataset."""
    path = location(path)
    if isinstance(path, RemotePath):
        try:
            return json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return None
    file = Path(path) / MANIFEST
    if not file.is_file():
        file = Path(path) / LEGACY_MANIFEST
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def is_complete(path: str | Path | RemotePath) -> bool:
    """True when `path` has a manifest and every shard it lists exists with its recorded size
    (on a store: from one listing, nothing downloaded but the manifest)."""
    path = location(path)
    manifest = read_manifest(path)
    if manifest is None:
        return False
    if isinstance(path, RemotePath):
        sizes = {k[len(path.key) + 1:]: i.get("size") for k, i in path.fs.find(path.key, detail=True).items()}
        return all(sizes.get(s["file"]) == s["bytes"] for s in manifest["shards"])
    return all(
        (Path(path) / s["file"]).is_file() and (Path(path) / s["file"]).stat().st_size == s["bytes"]
        for s in manifest["shards"]
    )


def decode_acts(column: pa.Array | pa.ChunkedArray, d_model: int, dtype: str) -> torch.Tensor:
    """The `act` column as a [n, d_model] tensor in the stored dtype, sharing Arrow's memory.

    The tensor is read-only in spirit: it aliases the Arrow buffer (no copy). Chunked columns
    are combined first (one copy when there is more than one chunk).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    width = d_model * ELEMENT_DTYPES[dtype][1]
    raw = np.frombuffer(column.buffers()[1], dtype=np.uint8, count=len(column) * width,
                        offset=column.offset * width)
    arr = raw.view(_NUMPY_VIEW[dtype]).reshape(len(column), d_model)
    with warnings.catch_warnings():  # Arrow buffers are immutable; torch warns but only reads
        warnings.simplefilter("ignore", UserWarning)
        acts = torch.from_numpy(arr)
    return acts.view(torch.bfloat16) if dtype == "bfloat16" else acts


class ActivationDataset:
    """A complete cached activation dataset (one model, one hook), opened from its folder.

    Attributes: `meta` (dict of the metadata below), `d_model`, `n_tokens`, `hook`, `dtype`
    (element dtype name), `shards` (Paths of the shard files, in token order).
    """

    def __init__(self, path: str | Path | RemotePath):
        place = location(path)
        self.source = place  # where the dataset lives (a remote one is read from its local mirror)
        if isinstance(place, RemotePath):
            remote = read_manifest(place)
            if remote is None:
                raise UserError(f"{place} holds no complete activation dataset: {MANIFEST} is missing "
                                "(re-run the cache step that writes it)")
            fetch(place, [s["file"] for s in remote["shards"]])
            fetch(place, [MANIFEST])  # last: a reader of the mirror trusts the manifest
            place = mirror_dir(place)
        self.path = place
        manifest = read_manifest(self.path)
        if manifest is None:
            hint = " (an interrupted run: re-run the same `sae-transfer cache` command to finish it)" \
                if (self.path / PROGRESS).exists() or any(self.path.glob("shard-*")) else ""
            raise UserError(f"{self.path} holds no complete activation dataset: {MANIFEST} is missing{hint}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{self.path} is activation format {manifest.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}: re-create it with `sae-transfer cache`"
            )
        self.manifest = manifest
        self.meta: dict = manifest["meta"]
        self.d_model: int = int(self.meta["d_model"])
        self.n_tokens: int = int(manifest["n_tokens"])
        self.hook: str = self.meta["hook"]
        self.dtype: str = self.meta["dtype"]
        self.shards: list[Path] = [self.path / s["file"] for s in manifest["shards"]]
        for shard, entry in zip(self.shards, manifest["shards"]):
            if not shard.is_file() or shard.stat().st_size != entry["bytes"]:
                raise UserError(f"shard {shard} is missing or has the wrong size: delete {self.path} and re-run the cache")

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored activation vector."""
        return self.d_model * ELEMENT_DTYPES[self.dtype][1]

    def read_table(self, columns: list[str] | None = None, filter=None) -> pa.Table:
        """All rows (or those matching `filter`, a pyarrow expression or DNF list) as one Table.

        Loads everything asked for into memory: meant for small eval sets and SQL-like checks.
        """
        return pq.read_table([str(s) for s in self.shards], columns=columns, filters=filter)

    def acts(self, table: pa.Table) -> torch.Tensor:
        """The `act` column of a table read from this dataset, as a [n, d_model] tensor (stored dtype)."""
        return decode_acts(table.column("act"), self.d_model, self.dtype)

    def verify(self) -> None:
        """Re-hash every shard against the manifest's sha256; raise UserError on a mismatch."""
        for shard, entry in zip(self.shards, self.manifest["shards"]):
            if entry.get("sha256") and sha256_file(shard) != entry["sha256"]:
                raise UserError(f"shard {shard} does not match its sha256: delete {self.path} and re-run the cache")

    def __repr__(self) -> str:
        return f"ActivationDataset({str(self.path)!r}, hook={self.hook!r}, n_tokens={self.n_tokens}, d_model={self.d_model})"



def local_dataset(path: str | Path | RemotePath) -> str:
    """A local folder holding the complete dataset at `path`: the folder itself, or this host's
    mirror of a remote one with the listed shards fetched (once per ETag). For code that opens
    dataset folders by local path."""
    return str(ActivationDataset(path).path)
