"""A local stand-in for the Hugging Face Hub: a hub cache folder laid out as huggingface_hub
writes it (refs/<branch> -> commit, snapshots/<commit>/files), which the real loading code
reads offline, and a fake `list_repo_refs` answer for the checkpoint watcher."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path


def commit_of(name: str) -> str:
    """A made-up 40-hex-digit commit id for a revision name."""
    return hashlib.sha1(name.encode()).hexdigest()


def fake_hub_cache(cache: Path, repo: str, revisions: dict[str, Path]) -> dict[str, str]:
    """Put each local checkpoint folder of `revisions` (branch name -> folder) into a hub cache
    at `cache` as revision `branch` of model repo `repo`; returns branch -> commit id."""
    folder = Path(cache) / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    commits = {}
    for branch, src in revisions.items():
        commit = commits[branch] = commit_of(f"{repo}@{branch}")
        (folder / "refs" / branch).write_text(commit)
        shutil.copytree(src, folder / "snapshots" / commit, dirs_exist_ok=True)
    return commits


@dataclass
class _Ref:
    name: str
    target_commit: str
    ref: str = ""


@dataclass
class FakeRefs:
    """What `huggingface_hub.list_repo_refs` returns, reduced to what the watcher reads."""

    branches: list = field(default_factory=list)
    tags: list = field(default_factory=list)


def fake_refs(branches: dict[str, str], tags: dict[str, str] | None = None) -> FakeRefs:
    """A `list_repo_refs` answer with these branches and tags (name -> commit)."""
    return FakeRefs([_Ref(n, c) for n, c in branches.items()], [_Ref(n, c) for n, c in (tags or {}).items()])
