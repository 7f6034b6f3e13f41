"""Where results live: a local folder, or a prefix on an object store (`s3://bucket/prefix`).

`location(root)` turns a results root into the path object the rest of `storage` works with:
a `pathlib.Path` for a plain path or a `file://` URL (everything local behaves as before), a
`RemotePath` for any other URL. `RemotePath` offers the small part of `Path` that `storage`
uses (`/`, `name`, `parent`, `exists`, `glob`, `read_bytes`, ...) on top of the fsspec file
system of its scheme (s3fs for `s3://`), so layout and tables build their paths one way.

The file system is configured the way every S3 tool is: the standard `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION` and `AWS_ENDPOINT_URL` variables, or an AWS profile;
nothing project-specific and nothing written down. Listings are never cached, so a reader
sees the parts another process wrote a moment ago.

Object stores have no rename, so "all or nothing" comes from the objects themselves: each
object is uploaded whole (one PUT, or a multipart upload that only appears when completed) from
bytes already in memory or a finished local file, and a dataset's manifest goes last
(`sae_transfer.storage.mirror` stages, publishes and fetches whole folders).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import fsspec

from sae_transfer.errors import UserError


def is_url(root: str | os.PathLike) -> bool:
    """True when `root` names an object-store location (a URL other than `file://`)."""
    text = str(root)
    return "://" in text and not text.startswith("file://")


def location(root: str | os.PathLike) -> Path | RemotePath:
    """The path object of a results root (or anything under it): a Path or a RemotePath."""
    if isinstance(root, (Path, RemotePath)):
        return root
    text = str(root)
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    return RemotePath(text) if is_url(text) else Path(text)


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except (ImportError, ValueError) as exc:
        raise UserError(f"cannot open {url!r} ({exc}): use s3://bucket/prefix, file:// or a plain folder") from None


class RemotePath:
    """A path on an object store, behaving like the read/write subset of `pathlib.Path` the
    storage layer needs. Folders are prefixes: `mkdir` does nothing, a folder exists when an
    object lies under it."""

    __slots__ = ("url", "protocol", "key")

    def __init__(self, url: str):
        scheme, _, rest = url.partition("://")
        self.protocol = scheme
        self.key = rest.strip("/")  # bucket/prefix/..., without the scheme
        self.url = f"{scheme}://{self.key}"

    # -- naming ---------------------------------------------------------------------------
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec file system of this URL's scheme (instances are cached by fsspec)."""
        return _filesystem(self.url)[0]

    def __truediv__(self, part: str) -> RemotePath:
        return RemotePath(f"{self.url}/{str(part).strip('/')}")

    def __str__(self) -> str:
        return self.url


    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < other.url

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(f"{self.protocol}://{self.key.rsplit('/', 1)[0]}") if "/" in self.key else self

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def relative_to(self, other: RemotePath) -> Path:
        if not self.key.startswith(other.key + "/"):
            raise ValueError(f"{self} is not under {other}")
        return Path(self.key[len(other.key) + 1:])

    def resolve(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    def as_uri(self) -> str:
        return self.url

    # -- queries ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.key)

    def is_file(self) -> bool:
        return self.fs.isfile(self.key)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.key)

    def info(self) -> dict:
        """The store's record of the object: size, ETag, last modified (no download)."""
        return self.fs.info(self.key)

    def glob(self, pattern: str) -> list[RemotePath]:
        """Objects matching `pattern` (relative, `*` within a name, as Path.glob), sorted."""
        found = self.fs.glob(f"{self.key}/{pattern}")
        return [RemotePath(f"{self.protocol}://{k}") for k in sorted(found)]

    def rglob(self, pattern: str) -> list[RemotePath]:
        return self.glob(f"**/{pattern}")

    def iterdir(self) -> list[RemotePath]:
        return [RemotePath(f"{self.protocol}://{k}") for k in sorted(self.fs.ls(self.key, detail=False))]

    # -- bytes ------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """Upload `data` as one object: it appears whole or not at all."""
        self.fs.pipe_file(self.key, bytes(data))
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb"):
        """A file object (reads are ranged GETs). Write through write_bytes/put_file instead: an
        fsspec write handle commits what it holds when closed by an exception."""
        if "w" in mode or "a" in mode:
            raise ValueError("write object-store files whole: write_bytes, or put_file from a local file")
        return self.fs.open(self.key, mode)

    def put_file(self, local: str | Path) -> None:
        """Upload a finished local file as this object (multipart for large files; it only
        appears when the upload completes)."""
        self.fs.put_file(str(local), self.key)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object-store folders are prefixes."""


def write_bytes_atomic(path: Path | RemotePath, data: bytes) -> None:
    """Write `data` so that readers see the old content or the whole new one: a temp file
    renamed into place locally, one whole object on a store."""
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def local_cache_dir(kind: str, url: str) -> Path:
    """A per-URL folder in this machine's cache (`SAE_TRANSFER_CACHE_DIR`, else
    ~/.cache/sae-transfer) for local copies of remote things (catalogs, datasets)."""
    import hashlib

    root = Path(os.environ.get("SAE_TRANSFER_CACHE_DIR") or Path.home() / ".cache" / "sae-transfer")
    name = hashlib.sha256(url.encode()).hexdigest()[:16]
    return root / kind / name


LEFTOVER_AGE_S = 3600.0  # a temporary file or unfinished upload this old belongs to a dead writer


def clean_leftovers(root: str | Path | RemotePath, older_than_s: float = LEFTOVER_AGE_S) -> int:
    """Delete what killed writers left under `root` and no reader ever accepts: temporary files
    (`.tmp-*`, `*.tmp`) and, on an object store, unfinished multipart uploads, when older than
    `older_than_s` (a live writer's are younger). Returns how many were removed."""
    import datetime as dt
    import time

    root = location(root)
    removed = 0
    if isinstance(root, RemotePath):
        fs = root.fs
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than_s)
        for key, info in fs.find(root.key, detail=True).items():
            name = key.rsplit("/", 1)[-1]
            modified = info.get("LastModified")
            if (name.startswith(".tmp") or name.endswith(".tmp")) and modified is not None and modified <= cutoff:
                fs.rm_file(key)
                removed += 1
        if root.protocol in ("s3", "s3a"):
            bucket, _, prefix = root.key.partition("/")
            listed = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/" if prefix else "")
            for upload in listed.get("Uploads", []):
                if upload["Initiated"] <= cutoff:
                    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    removed += 1
        return removed
    if not root.is_dir():
        return 0
    cutoff_s = time.time() - older_than_s
    for path in list(root.rglob(".tmp*")) + list(root.rglob("*.tmp")):
        try:
            if path.is_file() and path.stat().st_mtime <= cutoff_s:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # finished or cleaned meanwhile
            continue
    return removed


def store_error(url: str, exc: BaseException) -> UserError:
    """One line saying why the store behind `url` did not answer and which variable fixes it."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"
    detail = " ".join(str(exc).split())[:200]
    name = type(exc).__name__
    if "Credentials" in name:
        return UserError(f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(exc, PermissionError) or "AccessDenied" in detail or "signature" in detail.lower():
        return UserError(f"{url}: access denied by {endpoint} ({detail}): check AWS_ACCESS_KEY_ID, "
                         "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and AWS_REGION")
    if "Connect" in name or "Endpoint" in name or isinstance(exc, ConnectionError):
        return UserError(f"cannot reach the object store of {url} at {endpoint} ({detail}): check AWS_ENDPOINT_URL")
    return UserError(f"{url}: the object store at {endpoint} answered {name}: {detail}")


def probe(root: Path | RemotePath) -> bool:
    """Whether the results folder `root` exists; a store that cannot be asked is a UserError of
    one line naming the URL and the variable to fix."""
    if not isinstance(root, RemotePath):
        return root.is_dir()
    try:
        return root.is_dir()
    except Exception as exc:  # botocore and s3fs raise many kinds; all end in one line
        raise store_error(root.url, exc) from None
