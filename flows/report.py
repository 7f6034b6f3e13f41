"""build_report: rebuild the DuckDB catalog and the HTML/Markdown report of a study."""

from __future__ import annotations

from prefect import flow

from sae_transfer.study import StudyConfig
from sae_transfer.tasks.report import build_report as build_report_task


@flow(name="build_report", log_prints=True)
def build_report(config: StudyConfig) -> str:
    """Path of the rebuilt HTML report."""
    return build_report_task(config)
