"""Models and checkpoints on a real S3 server (the `s3_store` fixture): a model folder is fetched
once per content, again after one object changes; the watcher lists an s3:// prefix of
checkpoints as it lists a local folder, each new (or re-uploaded) checkpoint once."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from sae_transfer import remote
from sae_transfer.errors import UserError
from tests._tiny import tiny_model_dir


@pytest.fixture
def store(s3_store, monkeypatch, tmp_path):
    """The S3 server through the standard AWS variables, and a cache of this test's own."""
    s3_store.env(monkeypatch)
    monkeypatch.setenv("SAE_TRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    return s3_store


def _upload(folder: Path, url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            fs.put_file(str(file), f"{path}/{file.relative_to(folder).as_posix()}")


def _write(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "wb") as f:
        f.write(data)


def test_model_folder_is_fetched_once_and_again_after_a_change(store, tmp_path):
    model = tiny_model_dir(tmp_path)
    url = store.url("models", "base")
    _upload(model, url)
    first = remote.fetch(url)
    assert first.fetched
    assert sorted(p.name for p in first.path.iterdir()) == sorted(p.name for p in model.iterdir())
    assert (first.path / "config.json").read_bytes() == (model / "config.json").read_bytes()
    pinned = remote.pin(url)
    again = remote.fetch(pinned)
    assert not again.fetched and again.path == first.path  # unchanged: never downloaded again

    _write(f"{url}/generation_config.json", b'{"note": "changed"}')  # one object re-uploaded
    changed = remote.fetch(url)
    assert changed.fetched and changed.path != first.path
    assert (changed.path / "generation_config.json").read_bytes() == b'{"note": "changed"}'
    assert remote.pin(url) != pinned
    with pytest.raises(UserError, match="changed since it was pinned"):
        remote.fetch(pinned)  # a pinned revision is that content or nothing


def test_a_model_on_the_store_loads_like_a_hub_revision(store, tmp_path):
    from sae_transfer.checkpoints import checkpoint_id
    from sae_transfer.models import load_model, model_identity, parse_model_spec

    url = store.url("models", "chat")
    _upload(tiny_model_dir(tmp_path), url)
    pinned = remote.pin(url)
    ref = parse_model_spec(pinned)
    assert (ref.name, ref.spec) == (url, pinned)
    assert model_identity(pinned) == {"model_id": url, "model_revision": pinned.rsplit("@", 1)[1]}
    assert checkpoint_id(pinned) == pinned
    bridge = load_model(pinned, device="cpu")
    assert bridge.cfg.n_layers == 2
    with pytest.raises(UserError, match="no objects under"):
        remote.pin(store.url("nothing-here"))


def test_watcher_lists_an_s3_prefix_and_sees_each_checkpoint_once(store, tmp_path):
    from sae_transfer.checkpoints import scan_folder
    from sae_transfer.flows.watch import new_checkpoints
    from tests._tiny_study import tiny_study

    prefix = store.url("chat-checkpoints")
    model = tiny_model_dir(tmp_path)
    _upload(model, f"{prefix}/step-000010")
    _write(f"{prefix}/notes/readme.txt", b"not a checkpoint")  # no config.json: ignored
    _write(f"{prefix}/.tmp-step-000030/config.json", b"{}")  # a writer's leftovers: ignored
    found = scan_folder(prefix)
    assert [(c.step, c.path.rsplit("@", 1)[0]) for c in found] == [(10, f"{prefix}/step-000010")]

    cfg = tiny_study(tmp_path, name="watch")
    cfg = cfg.model_copy(update={"pair": cfg.pair.model_copy(update={"checkpoints": prefix})})
    assert [c.step for c in new_checkpoints(cfg)[1]] == [10]
    assert new_checkpoints(cfg)[1] == []  # seen: never started again
    _upload(model, f"{prefix}/step-000020")
    assert [c.step for c in new_checkpoints(cfg)[1]] == [20]
    _write(f"{prefix}/step-000010/generation_config.json", b"{}")  # step 10 re-uploaded: new content
    assert [c.step for c in new_checkpoints(cfg)[1]] == [10]
    assert new_checkpoints(cfg)[1] == []
