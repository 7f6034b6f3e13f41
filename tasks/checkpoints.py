"""Tasks: record a watched checkpoint, and publish what the checkpoint flows found as Prefect
artifacts (the drift table after each evaluation, one line per watch run)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from sae_transfer.checkpoints import Checkpoint, checkpoint_id
from sae_transfer.storage import catalog, tables
from sae_transfer.storage.layout import slug
from sae_transfer.study import StudyConfig


def _key(config: StudyConfig, what: str) -> str:
    """Artifact key (lowercase letters, digits, dashes) of one study's `what`."""
    return "-".join(["".join(ch if ch.isalnum() else "-" for ch in slug(config.name).lower()), what])


def seen_ids(config: StudyConfig) -> set[str]:
    """Checkpoint ids already started or evaluated for this study."""
    return set(tables.read_table(config.results_dir, "checkpoints").column("checkpoint_id").to_pylist())


@task(name="record-checkpoint", tags=["always-runs"])
def record_checkpoint(config: StudyConfig, spec: str, step: int, status: str) -> str:
    """Append one `checkpoints` row (`status` "seen" or "evaluated"); returns the checkpoint id,
    the same for the watcher and the evaluation (`sae_transfer.checkpoints.checkpoint_id`)."""
    ckpt_id = checkpoint_id(spec)
    tables.append_rows(config.results_dir, "checkpoints", [dict(
        checkpoint_id=ckpt_id, path=spec, step=step, status=status, flow_run_id=None)])
    return ckpt_id


@task(name="publish-drift", tags=["always-runs"])
def publish_drift(config: StudyConfig, step: int) -> int:
    """Table artifact: every SAE on every checkpoint so far, the `step` just evaluated marked
    `new`; returns the number of rows published."""
    drift = catalog.query(config.results_dir, catalog.load_query("checkpoint_drift"), [config.pair.base, config.pair.chat])
    drift.insert(0, "new", drift["step"] == step)
    create_table_artifact(drift.astype(object).where(drift.notna(), None).to_dict("records"),
                          key=_key(config, "checkpoint-drift"),
                          description=f"Transfer on fine-tuning checkpoints so far; `new` marks step {step}")
    return len(drift)


@task(name="publish-watch", tags=["always-runs"])
def publish_watch(config: StudyConfig, found: list[Checkpoint], new: list[Checkpoint], how: str) -> str:
    """Markdown artifact, one line: how many checkpoints the watch run found and which were new
    (evaluated `how`: "inline" or "via deployment"); returns the line."""
    if new:
        names = ", ".join(f"`{c.path}` (step {c.step})" for c in new)
        line = f"watch `{config.name}`: {len(found)} checkpoints found, {len(new)} new, evaluated {how}: {names}"
    else:
        line = f"watch `{config.name}`: {len(found)} checkpoints found, nothing new"
    create_markdown_artifact(line, key=_key(config, "checkpoint-watch"), description="What this watch run found")
    return line
