"""Tasks: record a run's provenance, and build the report (with Prefect artifacts)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

import sae_transfer
from sae_transfer.storage import tables
from sae_transfer.study import StudyConfig, config_json


def release_version() -> str:
    """Package version plus the git commit of the working tree when there is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return sae_transfer.__version__ + (f"+{commit}" if commit else "")


@task(name="record-run", tags=["always-runs"])
def record_run(config: StudyConfig, flow: str, run_id: str, timings: dict[str, tuple[float, bool]]) -> int:
    """Append one `runs` row per DAG step (seconds, cached?) plus a total; returns rows written."""
    common = dict(run_id=run_id, flow=flow, study=config.name, config_hash=config.fingerprint(),
                  config_json=config_json(config), code_version=release_version())
    rows = [dict(common, step=step, seconds=seconds, cached=cached) for step, (seconds, cached) in timings.items()]
    tables.append_rows(config.results_dir, "runs", rows)
    return len(rows)


@task(name="build-report", tags=["always-runs"])
def build_report(config: StudyConfig, upstream: list | None = None) -> str:
    """Rebuild the DuckDB catalog and the HTML/Markdown report; publish Prefect artifacts."""
    from sae_transfer.report.build import build_report as build
    from sae_transfer.storage import catalog

    paths = build(config.results_dir, config.pair.base, config.pair.chat, title=f"SAE transfer study: {config.name}")
    transfer = catalog.query(config.results_dir, catalog.load_query("transfer_table"), [config.pair.base, config.pair.chat])
    outliers = catalog.query(config.results_dir, catalog.load_query("outlier_table"))
    key = "".join(ch if ch.isalnum() else "-" for ch in config.name.lower())
    create_table_artifact(transfer.fillna("").to_dict("records"), key=f"{key}-transfer", description="Transfer matrix")
    create_table_artifact(outliers.fillna("").to_dict("records"), key=f"{key}-outliers", description="Outlier summary")
    create_markdown_artifact(paths.markdown.read_text(), key=f"{key}-report", description="Base-vs-chat report")
    create_link_artifact(paths.html.resolve().as_uri(), key=f"{key}-report-html", description="HTML report")
    get_run_logger().info("report: %s", paths.html)
    return str(paths.html)
