"""Models and checkpoints on an object store (`s3://bucket/prefix`, or any fsspec URL): listed
with their ETags, fetched once per worker into a local cache keyed by them.

A model folder on a store is treated like a Hub model pinned to a commit: `s3://b/models/chat@<fp>`,
where `<fp>` fingerprints its objects' names, ETags and sizes (from the listing, nothing
downloaded). A re-uploaded checkpoint gets a new fingerprint, so Prefect's cache keys, the
watcher's checkpoint ids and the tables' `model_revision` all change with its content; an
unchanged one is fetched once per machine and never again. Credentials and the endpoint come
from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
AWS_ENDPOINT_URL) or a profile, as for every S3 tool.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from sae_transfer.errors import UserError

_PIN = re.compile(r"^(?P<url>.+)@(?P<fp>[0-9a-f]{16})$")
_TMP_PREFIXES = (".tmp", "_tmp")  # a writer's temporary objects are not part of a model


def is_remote(spec: str) -> bool:
    """True for a URL on an object store (`s3://…`, `gs://…`); False for paths, `file://` and Hub ids."""
    return "://" in str(spec) and not str(spec).startswith("file://")


@dataclass(frozen=True)
class RemoteObject:
    """One object of a remote folder: its name relative to the folder, ETag and size in bytes."""

    name: str
    etag: str
    size: int


@dataclass(frozen=True)
class Fetched:
    """A remote folder's local copy, and whether this call downloaded it (False: already cached)."""

    path: Path
    fetched: bool


def split_pin(spec: str) -> tuple[str, str | None]:
    """`s3://b/m@<16 hex>` -> ("s3://b/m", fingerprint); an unpinned URL -> (url, None)."""
    match = _PIN.match(spec)
    return (match["url"], match["fp"]) if match else (spec.rstrip("/"), None)


def _fs(url: str):
    """(fsspec file system, path inside it) of `url`; UserError naming the URL when it cannot be opened."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise UserError(f"cannot open {url!r} ({exc}): use an s3:// URL (credentials and endpoint from "
                        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL)") from None


def _listing(url: str) -> dict[str, dict]:
    """Object path -> its listing entry, for every object under `url` (one recursive listing)."""
    fs, path = _fs(url)
    try:
        found = fs.find(path, detail=True, refresh=True) if fs.isdir(path) else {}
    except (OSError, PermissionError) as exc:
        raise UserError(f"cannot list {url!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                        "check AWS_ENDPOINT_URL, the credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and "
                        "the bucket name") from None
    return {p: info for p, info in found.items() if info.get("type", "file") == "file"}


def _object(name: str, info: dict) -> RemoteObject:
    etag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified") or "").strip('"')
    return RemoteObject(name, etag, int(info.get("size") or 0))


def list_folder(url: str) -> list[RemoteObject]:
    """The objects of the folder at `url` (temporary names skipped), sorted by name."""
    url = split_pin(url)[0]
    _, root = _fs(url)
    objects = []
    for path, info in _listing(url).items():
        name = path[len(root.rstrip("/")) + 1:]
        if not any(part.startswith(_TMP_PREFIXES) for part in name.split("/")):
            objects.append(_object(name, info))
    return sorted(objects, key=lambda o: o.name)


def fingerprint(objects: list[RemoteObject]) -> str:
    """Content fingerprint (16 hex chars) of a remote folder, from its objects' names, ETags and sizes."""
    digest = hashlib.sha256()
    for o in sorted(objects, key=lambda o: o.name):
        digest.update(f"{o.name}\0{o.etag}\0{o.size}\n".encode())
    return digest.hexdigest()[:16]


def pin(spec: str) -> str:
    """`spec` pinned to its current content (`url@<fingerprint>`); a pinned spec or a non-URL unchanged."""
    if not is_remote(spec) or split_pin(spec)[1]:
        return spec
    objects = list_folder(spec)
    if not objects:
        raise UserError(f"no objects under {spec!r}: upload the model folder there (config.json, weights, "
                        "tokenizer), or fix pair.base / pair.chat / pair.checkpoints")
    return f"{spec.rstrip('/')}@{fingerprint(objects)}"


def cache_root() -> Path:
    """This machine's cache of remote models: `$SAE_TRANSFER_CACHE_DIR/models` (default ~/.cache/sae-transfer)."""
    root = os.environ.get("SAE_TRANSFER_CACHE_DIR") or Path.home() / ".cache" / "sae-transfer"
    return Path(root) / "models"


def fetch(spec: str) -> Fetched:
    """The local copy of the remote folder `spec` (a URL, optionally pinned `url@<fingerprint>`),
    downloaded unless this machine has its current content already. The copy lives at
    `cache_root()/<url hash>/<fingerprint>` and appears whole (downloaded to a temporary folder,
    renamed into place), so concurrent workers and killed downloads never leave a partial model
    where a loader would take it. UserError when a pinned folder has changed since."""
    url, want = split_pin(spec)
    objects = list_folder(url)
    if not objects:
        raise UserError(f"no objects under {url!r}: upload the model folder there, or fix the model URL")
    have = fingerprint(objects)
    if want and want != have:
        raise UserError(f"model {url!r} changed since it was pinned ({want} -> {have}): re-run the study, "
                        "which evaluates the new content as a new revision")
    dest = cache_root() / hashlib.sha256(url.encode()).hexdigest()[:16] / have
    if dest.is_dir():
        return Fetched(dest, False)
    tmp = dest.parent / f".tmp-{have}-{uuid.uuid4().hex[:8]}"
    fs, root = _fs(url)
    try:
        for o in objects:
            target = tmp / o.name
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get(f"{root.rstrip('/')}/{o.name}", str(target))
        try:
            os.rename(tmp, dest)
        except OSError:  # another worker of this machine put the same content in place first
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Fetched(dest, True)


def scan(url: str) -> list[tuple[str, str]]:
    """(name, pinned URL) of every model folder (one with a config.json) directly under the prefix `url`."""
    url = url.rstrip("/")
    objects = list_folder(url)
    folders: dict[str, list[RemoteObject]] = {}
    for o in objects:
        top, _, rest = o.name.partition("/")
        if rest and not top.startswith("."):
            folders.setdefault(top, []).append(RemoteObject(rest, o.etag, o.size))
    return sorted((name, f"{url}/{name}@{fingerprint(objs)}") for name, objs in folders.items()
                  if any(o.name == "config.json" for o in objs))


def config_copy(spec: str) -> Path:
    """A local folder holding only the remote model's config.json (a few kB: what a plan reads)."""
    url, _ = split_pin(spec)
    fs, root = _fs(url)
    dest = cache_root() / "configs" / hashlib.sha256(url.encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".tmp-{uuid.uuid4().hex[:8]}"
    try:
        fs.get(f"{root.rstrip('/')}/config.json", str(tmp))
    except FileNotFoundError:
        raise UserError(f"no config.json under {url!r}: a model folder needs one (save_pretrained output)") from None
    os.replace(tmp, dest / "config.json")
    return dest
