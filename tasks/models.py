"""Task: make sure the model pair exists (builds the offline demo pair when asked)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from sae_transfer import remote
from sae_transfer.demo.build import build_demo_pair, demo_paths
from sae_transfer.demo.config import PRESETS
from sae_transfer.errors import UserError
from sae_transfer.models import ModelRef
from sae_transfer.study import PairConfig
from sae_transfer.tasks.records import PairRecord


@task(name="prepare-pair", persist_result=False, tags=["always-runs"])
def prepare_pair(pair: PairConfig) -> PairRecord:
    """Build the demo pair if the config points at it and it is missing. The record names each
    model pinned to its configured revision (`org/name@rev`; a model on an object store to its
    objects' ETags, `s3://…@<fingerprint>`), so every step that loads it downstream (cache,
    outliers, evaluation) loads that revision, and its cache keys change with its content."""
    built = False
    if pair.build_demo:
        out = Path(pair.base).parent
        paths = demo_paths(out)
        if Path(pair.base) != paths.base or Path(pair.chat) != paths.chat:
            raise UserError(f"pair.build_demo is set but base/chat are not {paths.base} and {paths.chat}: set build_demo: false")
        report = build_demo_pair(out, PRESETS[pair.demo_preset], progress=True)
        built = not report.skipped
        get_run_logger().info("demo pair %s (%s)", out, "built" if built else "already built")
    return PairRecord(base=remote.pin(ModelRef(pair.base, pair.base_revision).spec),
                      chat=remote.pin(ModelRef(pair.chat, pair.chat_revision).spec),
                      checkpoints=pair.checkpoints, built=built)
