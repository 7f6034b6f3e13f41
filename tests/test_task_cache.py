"""Content cache keys: input folders by content, configs as written, code by source hash."""

from __future__ import annotations

from sae_transfer.study import parse_study
from sae_transfer.tasks._cache import _jsonable, code_version
from sae_transfer.tasks.records import ActsRecord


def test_input_paths_are_keyed_by_content_not_by_name(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "w.bin").write_bytes(b"a")
    before = _jsonable("model", str(model))
    assert _jsonable("model", str(model)) == before  # stable
    (model / "w.bin").write_bytes(b"b")
    assert _jsonable("model", str(model)) != before
    # output folders are not inputs: their content must not enter the key
    assert _jsonable("out_dir", str(model)) == str(model)


def test_records_are_fingerprinted_but_configs_are_not(tmp_path):
    acts = tmp_path / "acts"
    acts.mkdir()
    (acts / "part.parquet").write_bytes(b"x")
    rec = ActsRecord(path=str(acts), model="m", hook="h", n_tokens=1, reused=False)
    assert "content" in _jsonable("acts", rec)["path"]
    cfg = parse_study({"pair": {"base": str(acts), "chat": str(acts), "build_demo": False}})
    before = _jsonable("config", cfg)
    (acts / "part.parquet").write_bytes(b"y")
    assert _jsonable("config", cfg) == before


def test_code_version_follows_the_named_sources():
    assert code_version("sae_transfer.evals") == code_version("sae_transfer.evals")
    assert code_version("sae_transfer.evals") != code_version("sae_transfer.training")


def test_output_folders_key_by_absolute_path(tmp_path, monkeypatch):
    # Two checkouts of the project both write `results/...`: a record cached in one must not be
    # reused by the other, whose results folder does not hold the files it points to.
    from sae_transfer.tasks._cache import _jsonable

    keys = []
    for checkout in ("a", "b"):
        (tmp_path / checkout).mkdir()
        monkeypatch.chdir(tmp_path / checkout)
        keys.append(_jsonable("out_dir", "results/demo/activations"))
    assert keys[0] != keys[1] and keys[0].endswith("a/results/demo/activations")


def test_a_reused_dataset_keys_its_dependents_like_a_fresh_one(tmp_path):
    # adding a hook re-caches the model: the old hook's dataset comes back reused=True, and the
    # SAE trained on it must stay a cache hit
    acts = tmp_path / "acts"
    acts.mkdir()
    (acts / "part.parquet").write_bytes(b"x")
    fresh = ActsRecord(path=str(acts), model="m", hook="h", n_tokens=1, reused=False)
    assert _jsonable("acts", fresh) == _jsonable("acts", fresh.model_copy(update={"reused": True}))
    assert _jsonable("acts", fresh) != _jsonable("acts", fresh.model_copy(update={"n_tokens": 2}))
