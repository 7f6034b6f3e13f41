"""Prefect cache keys on content, not on paths or run ids.

A task's key hashes: the task's name, its code version (the sae-transfer version plus a hash
of the task module's source), every parameter's JSON form, and for every parameter that names
an existing file or folder, that path's content fingerprint. Upstream tasks return records
that carry their own content address, so keys chain through the DAG: touching the chat model
changes the keys of exactly the tasks downstream of it.
"""

from __future__ import annotations

import hashlib
import inspect
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel

import sae_transfer
from storage.fingerprint import fingerprint, hash_payload

_PATH_KEYS = ("path", "dir", "model", "sae", "acts", "folder", "base", "chat")


def _looks_like_path(name: str, value: object) -> bool:
    if isinstance(value, Path):
        return True
    return isinstance(value, str) and any(k in name.lower() for k in _PATH_KEYS) and Path(value).exists()


def _jsonable(name: str, value: object) -> object:
    if isinstance(value, BaseModel):
        return {k: _jsonable(k, v) for k, v in value.model_dump().items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(name, v) for v in value]
    if _looks_like_path(name, value) and Path(value).exists():
        return {"path": str(value), "content": fingerprint(value)}
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _code_version(fn) -> str:
    try:
        source = inspect.getsource(inspect.getmodule(fn))
    except (OSError, TypeError):
        source = ""
    return sae_transfer.__version__ + ":" + hashlib.sha256(source.encode()).hexdigest()[:12]


def content_key(context, parameters: dict) -> str:
    """cache_key_fn for @task: see the module docstring."""
    fn = context.task.fn
    payload = {name: _jsonable(name, value) for name, value in sorted(parameters.items())}
    return f"{context.task.name}-{hash_payload(_code_version(fn), payload)}"


CACHE_OPTIONS = dict(
    cache_key_fn=content_key,
    persist_result=True,
    result_serializer="json",
    cache_expiration=timedelta(days=365),
)
