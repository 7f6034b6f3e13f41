"""Finding fine-tuning checkpoints: subfolders of a local folder or of an object-store prefix, or a
Hub repo's revisions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sae_transfer import remote
from sae_transfer.errors import UserError
from sae_transfer.models import ModelRef, is_local, parse_model_spec
from sae_transfer.storage.fingerprint import fingerprint

_STEP = re.compile(r"(\d+)(?!.*\d)")


@dataclass(frozen=True)
class Checkpoint:
    """One model checkpoint to evaluate."""

    path: str  # what to load: a local folder, "<repo>@<commit>" or "<s3 url>@<ETag fingerprint>" (pinned: a moved
    # branch or a re-uploaded checkpoint is a new checkpoint)
    step: int  # training step parsed from the folder or branch/tag name; -1 when the name has no number
    ref: str | None = None  # Hub branch or tag the commit was listed under (None for local folders)


def step_of(name: str) -> int:
    """The last number in a checkpoint name (`step-000120` -> 120, `checkpoint-500` -> 500), else -1."""
    match = _STEP.search(name)
    return int(match.group(1)) if match else -1


def scan_folder(folder: str | Path) -> list[Checkpoint]:
    """Hugging Face checkpoint folders (with config.json) directly inside `folder` (a local folder,
    or an s3:// prefix: each pinned to its objects' ETags), by step."""
    if remote.is_remote(str(folder)):
        found = [Checkpoint(url, step_of(name)) for name, url in remote.scan(str(folder))]
        return sorted(found, key=lambda c: (c.step, c.path))
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"checkpoint folder {str(root)!r} does not exist: "
                        "point --checkpoints at a folder of Hugging Face checkpoint folders")
    found = [
        Checkpoint(str(p), step_of(p.name))
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file()
    ]
    return sorted(found, key=lambda c: (c.step, c.path))


def scan_hub(repo: str) -> list[Checkpoint]:
    """Branches and tags of a Hub model repo as checkpoints (network: only when the user named a repo)."""
    from huggingface_hub import list_repo_refs  # deferred: the Hub client takes ~0.5 s to import

    try:
        refs = list_repo_refs(repo)
    except Exception as exc:  # the Hub client raises many types; the user needs one line
        raise UserError(f"could not list revisions of {repo!r}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    found = [Checkpoint(ModelRef(repo, ref.target_commit).spec, step_of(ref.name), ref.name)
             for ref in [*refs.branches, *refs.tags]]
    return sorted(found, key=lambda c: (c.step, c.path))


def checkpoint_id(spec: str) -> str:
    """The id a checkpoint is recorded under, by the watcher and by its evaluation alike: a local
    folder's content fingerprint (a re-saved folder is a new checkpoint), else the pinned spec
    itself (`repo@commit`, or `s3://…@<ETag fingerprint>`, as the watcher pins it)."""
    if is_local(spec):
        return fingerprint(Path(spec).expanduser())
    return parse_model_spec(spec).spec

