"""Prefect cache keys on content, not on paths or run ids.

A task's key hashes: the task's name, its code version (the sae-transfer version plus a hash
of the task module's source and of every module of the packages it names), every parameter's
JSON form, and for every parameter that names
an existing file or folder, that path's content fingerprint. Upstream tasks return records
that carry their own content address, so keys chain through the DAG: touching the chat model
changes the keys of exactly the tasks downstream of it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel

import sae_transfer
from sae_transfer.storage.fingerprint import fingerprint, hash_payload
from sae_transfer.storage.store import RemotePath, location
from sae_transfer.tasks.records import _Record

# Parameters (and record fields) whose value names an INPUT file or folder: hashed by content.
# Output folders (out_dir, results_dir, run_dir) are deliberately not: their content is what
# the task writes, and hashing it would make every key stale the moment the task ran.
_INPUT_PATH_NAMES = {"path", "model", "sae", "acts", "base", "chat", "checkpoint", "prompts"}
# Output folders enter the key as absolute paths: the results a cached record points to live
# under them, so a second checkout of the project (its own `results/`) never reuses a record
# whose files are in another checkout.
_OUTPUT_PATH_NAMES = {"out_dir", "results_dir", "run_dir"}


def _looks_like_path(name: str, value: object) -> bool:
    named = name in _INPUT_PATH_NAMES or name.endswith(("_path", "_paths"))
    return named and isinstance(value, (str, Path, RemotePath)) and location(value).exists()


def _output_location(value: object) -> str:
    """An output folder as it enters a key: absolute locally, the URL itself on a store."""
    place = location(str(value))
    return str(place if isinstance(place, RemotePath) else place.expanduser().resolve())


def _jsonable(name: str, value: object, paths: bool = True) -> object:
    """JSON form of a parameter; input paths (when `paths`) become {path, content hash}.

    Only top-level parameters and task records are searched for input paths: a config object
    (StudyConfig) is hashed as written, so a task taking the config does not depend on the
    content of every model the config names, only on the ones passed to it explicitly.
    """
    if isinstance(value, BaseModel):
        inner = paths and isinstance(value, _Record)
        if not inner:
            return value.model_dump(mode="json")
        return {k: _jsonable(k, v, inner) for k, v in value.model_dump().items() if k not in value.STATUS_FIELDS}
    if isinstance(value, dict):
        return {str(k): _jsonable(str(k), v, paths) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(name, v, paths) for v in value]
    if paths and _looks_like_path(name, value):
        return {"path": str(value), "content": fingerprint(value)}
    if name in _OUTPUT_PATH_NAMES and isinstance(value, (str, Path, RemotePath)):
        return _output_location(value)
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


@functools.cache
def _source_hash(module_name: str) -> str:
    """sha256 of a module's source, or of every .py file of a package (sorted by path)."""
    module = importlib.import_module(module_name)
    files = (sorted(Path(module.__file__).parent.rglob("*.py")) if module.__file__.endswith("__init__.py")
             else [Path(module.__file__)])
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def code_version(*modules: str) -> str:
    """sae-transfer's version plus a hash of the named modules' or packages' source."""
    return sae_transfer.__version__ + ":" + hash_payload([_source_hash(n) for n in modules])


def cached(*code: str) -> dict:
    """@task options for a content-keyed, JSON-persisted cache. `code` names the modules or
    packages whose source the task's output depends on: editing them invalidates the cache
    (a fixed metric is recomputed), editing anything else does not."""

    def content_key(context, parameters: dict) -> str:
        payload = {name: _jsonable(name, value) for name, value in sorted(parameters.items())}
        for name, value in parameters.items():  # a study config's results land under its results_dir
            if hasattr(value, "results_dir"):
                payload[f"{name}.results_dir"] = _output_location(value.results_dir)
        return f"{context.task.name}-{hash_payload(code_version(context.task.fn.__module__, *code), payload)}"

    return dict(cache_key_fn=content_key, persist_result=True, result_serializer="json",
                cache_expiration=timedelta(days=365))


def run_name(prefix: str, *params: str):
    """A task_run_name callable: `prefix-<value of each named parameter>` (the last part of a
    path; `name.field` reads a field of a record parameter, e.g. `acts.hook`)."""

    def value(values: dict, spec: str) -> str:
        name, _, field = spec.partition(".")
        v = values.get(name, "")
        if field:
            v = v.get(field, "") if isinstance(v, dict) else getattr(v, field, "")
        return "" if v is None else str(v).rstrip("/").split("/")[-1]

    def name() -> str:
        from prefect.runtime import task_run

        parts = [value(task_run.parameters, p) for p in params]
        return "-".join([prefix, *[p for p in parts if p]])

    return name
