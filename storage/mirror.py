"""This machine's mirror of object-store folders: where remote things are fetched to (once per
ETag) and where writers stage what they publish (the manifest last).

A folder `s3://bucket/key` is mirrored at `$SAE_TRANSFER_CACHE_DIR/objects/s3/bucket/key`
(default `~/.cache/sae-transfer`). `.etags.json` in a mirrored folder records the ETag and size
of each file held, so an unchanged object is never downloaded twice and a writer's own
published output is never downloaded at all. Tasks use `local_copy` for inputs the science
opens as local folders and `staged_output` for output folders.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sae_transfer.storage.store import RemotePath, location, write_bytes_atomic

ETAGS_FILE = ".etags.json"  # in a local mirror: relative name -> [ETag, size] of the copy held


def mirror_dir(remote: RemotePath) -> Path:
    """This machine's local copy of a remote folder: where it is fetched to, and where a writer
    stages what it will publish there (so a writer's own output is never downloaded again). It
    keeps the remote names (`<cache>/objects/s3/<bucket>/<key>`), so code that names things by
    their folder (an SAE by its run folder) names a copy as it names the original."""
    root = Path(os.environ.get("SAE_TRANSFER_CACHE_DIR") or Path.home() / ".cache" / "sae-transfer")
    return root / "objects" / remote.protocol / remote.key


def _etags(local: Path) -> dict:
    try:
        return json.loads((local / ETAGS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _save_etags(local: Path, etags: dict) -> None:
    write_bytes_atomic(local / ETAGS_FILE, json.dumps(etags, sort_keys=True).encode())


def publish(local: Path, remote: RemotePath, names: list[str], last: list[str] = ()) -> None:
    """Upload `names` (relative to `local`), then `last` (the manifest or marker that makes the
    folder complete), each as a whole object; record their ETags in the mirror so reading them
    back fetches nothing. Objects already there with the same size and ETag are not re-sent."""
    etags = _etags(local)
    held = {k[len(remote.key) + 1:]: i for k, i in remote.fs.find(remote.key, detail=True).items()}

    def send(name: str) -> tuple[str, list]:
        size = (local / name).stat().st_size
        mine = etags.get(name)
        if name in held and mine and mine == [held[name].get("ETag"), held[name].get("size")] and size == mine[1]:
            return name, mine
        (remote / name).put_file(local / name)
        info = (remote / name).info()
        return name, [info.get("ETag"), info.get("size")]

    with cf.ThreadPoolExecutor(max_workers=8) as pool:  # uploads are I/O bound: several in flight
        etags.update(dict(pool.map(send, [n for n in names if n not in last])))
    for name in last:
        etags.update([send(name)])
    _save_etags(local, etags)


def fetch(remote: RemotePath, names: list[str], local: Path | None = None) -> Path:
    """Bring `names` of a remote folder into its local mirror (or `local`), downloading only
    objects whose ETag or size differ from the copy held; returns the local folder. Each file
    arrives under a temporary name and is renamed into place, so a killed fetch leaves nothing
    a reader accepts."""
    local = local or mirror_dir(remote)
    local.mkdir(parents=True, exist_ok=True)
    etags = _etags(local)
    listing = {k[len(remote.key) + 1:]: i for k, i in remote.fs.find(remote.key, detail=True).items()}
    missing = [n for n in names if n not in listing]
    if missing:
        raise FileNotFoundError(f"{remote}: no object {missing[0]!r}")

    def get(name: str) -> tuple[str, list]:
        stamp = [listing[name].get("ETag"), listing[name].get("size")]
        target = local / name
        if etags.get(name) == stamp and target.is_file() and target.stat().st_size == stamp[1]:
            return name, stamp
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{uuid.uuid4().hex}-{target.name}")
        try:
            remote.fs.get_file(f"{remote.key}/{name}", str(tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return name, stamp

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        etags.update(dict(pool.map(get, names)))
    _save_etags(local, etags)
    return local


def _skip(name: str) -> bool:
    return name == ETAGS_FILE or any(p.startswith(".tmp") or p.endswith(".tmp") for p in name.split("/"))


def local_copy(path: str | Path | RemotePath, *, exclude: tuple[str, ...] = ()) -> str:
    """A local path holding what `path` holds: `path` itself when local; for a URL, its objects
    fetched (once per ETag) into this machine's mirror, without names starting with `exclude`.
    Tasks call this on inputs the science reads as folders (an SAE, a crosscoder)."""
    place = location(path)
    if not isinstance(place, RemotePath):
        return str(path)
    keys = place.fs.find(place.key, withdirs=False)
    if not keys:
        raise FileNotFoundError(f"{place}: nothing there")
    if keys == [place.key]:  # a single object
        fetch(place.parent, [place.name])
        return str(mirror_dir(place))
    names = [k[len(place.key) + 1:] for k in keys]
    fetch(place, [n for n in names if not _skip(n) and not n.startswith(exclude)])
    return str(mirror_dir(place))


class StagedOutput:
    """A task's output folder: `local` is where the science writes; on a store, `publish` sends
    it there, its marker last (see `staged_output`)."""

    def __init__(self, out: str | Path | RemotePath, marker: str):
        self.target = location(out)
        self.marker = marker
        self.remote = isinstance(self.target, RemotePath)
        self.local = mirror_dir(self.target) if self.remote else self.target

    def remote_of(self, path: str | Path) -> str:
        """Where a path under `local` lives once published (itself when local)."""
        if not self.remote:
            return str(path)
        rel = Path(path).resolve().relative_to(self.local.resolve()).as_posix()
        return str(self.target if rel == "." else self.target / rel)

    def publish(self) -> None:
        if not self.remote or not self.local.is_dir():
            return
        names = sorted(p.relative_to(self.local).as_posix() for p in self.local.rglob("*") if p.is_file())
        names = [n for n in names if not _skip(n) and not n.startswith("_progress")]
        publish(self.local, self.target, names, last=[self.marker] if self.marker in names else [])


@contextmanager
def staged_output(out: str | Path | RemotePath, marker: str, *, exclude: tuple[str, ...] = ()) -> Iterator[StagedOutput]:
    """Run a writer whose output folder may be on a store: locally nothing changes; on a store,
    a complete output already there (its `marker` object exists) is fetched into the mirror
    first (so the writer finds it done, without `exclude`d names), the writer fills the mirror,
    and on success everything is published, `marker` last. A failed writer publishes nothing."""
    staged = StagedOutput(out, marker)
    if staged.remote and (staged.target / marker).exists() and not (staged.local / marker).exists():
        local_copy(staged.target, exclude=exclude)
    yield staged
    staged.publish()
