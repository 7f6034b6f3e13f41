"""Content fingerprints of files and folders, cheap on re-runs.

Local files: sha256 of every file's bytes, remembered per (path, size, mtime_ns) in a small
JSON memo so an unchanged 14 GB checkpoint is hashed once, not on every run. Touching a file's
content changes its size or mtime, which invalidates the memo entry.

Objects on a store (`s3://...`): the store's own content tag (ETag) and size of every object,
from one listing, without downloading a byte. An ETag is an MD5 of the bytes for a single-PUT
object and an MD5 of the parts' MD5s for a multipart one: equal content uploaded differently
may get another fingerprint (a needless re-run), changed content never keeps it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from sae_transfer.storage.store import RemotePath, location

_LOCK = threading.Lock()
_SKIP_NAMES = {".DS_Store", "__pycache__"}


def _memo_path() -> Path:
    root = os.environ.get("SAE_TRANSFER_CACHE_DIR") or Path.home() / ".cache" / "sae-transfer"
    return Path(root) / "fingerprints.json"


def _load_memo() -> dict:
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_memo(memo: dict) -> None:
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError:  # a read-only home only costs re-hashing next time
        pass


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _skipped(name: str) -> bool:
    return name in _SKIP_NAMES or name.endswith(".tmp") or name.startswith(".tmp")


def remote_objects(path: str | RemotePath) -> dict[str, dict]:
    """Relative name -> the store's record (size, ETag, ...) of the object at `path`, or of every
    object under that prefix; temporary names skipped. One listing, no download."""
    path = location(path)
    fs = path.fs
    found = fs.find(path.key, detail=True, withdirs=False)
    if not found:
        raise FileNotFoundError(str(path))
    if list(found) == [path.key]:
        return {path.name: found[path.key]}
    return {k[len(path.key) + 1:]: info for k, info in sorted(found.items())
            if not any(_skipped(p) for p in k[len(path.key) + 1:].split("/"))}


def remote_fingerprint(path: str | RemotePath) -> str:
    """Content hash (16 hex chars) of an object or prefix from its objects' ETags and sizes."""
    objects = remote_objects(path)
    return hash_payload(sorted((name, str(info.get("ETag", "")).strip('"'), info.get("size"))
                               for name, info in objects.items()))


def fingerprint(path: str | Path | RemotePath) -> str:
    """Content hash (16 hex chars) of a file, or of a folder's files (names + bytes); of an
    object-store object or prefix, from the store's ETags (`remote_fingerprint`).

    Temporary files (`*.tmp`, names starting with `.tmp`) are ignored, so an interrupted
    writer does not change the fingerprint of what is complete.
    """
    path = location(path)
    if isinstance(path, RemotePath):
        return remote_fingerprint(path)
    if not path.exists():
        raise FileNotFoundError(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not _skipped(p.name)
    )
    with _LOCK:
        memo = _load_memo()
        changed = False
        digest = hashlib.sha256()
        for file in files:
            stat = file.stat()
            key = str(file.resolve())
            stamp = [stat.st_size, stat.st_mtime_ns]
            entry = memo.get(key)
            if entry is None or entry[:2] != stamp:
                entry = stamp + [sha256_file(file)]
                memo[key] = entry
                changed = True
            rel = file.name if file == path else str(file.relative_to(path))
            digest.update(f"{rel}\0{entry[2]}\n".encode())
        if changed:
            _save_memo(memo)
    return digest.hexdigest()[:16]


def hash_payload(*parts: object) -> str:
    """Stable 16-hex-char hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
