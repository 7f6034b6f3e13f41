"""The DuckDB catalog: views over Parquet parts, empty tables, report queries, bound values."""

from __future__ import annotations

import duckdb
import pytest

from sae_transfer.storage import catalog, tables
from tests import _synthetic_results as synth


def test_views_cover_every_table_even_when_empty(tmp_path):
    path = catalog.build_catalog(tmp_path)
    con = duckdb.connect(str(path), read_only=True)
    names = {row[0] for row in con.execute("select view_name from duckdb_views() where not internal").fetchall()}
    assert set(tables.SCHEMAS) | {"runs", "checkpoints", "training_log"} <= names
    assert {f"{name}_history" for name in names if not name.endswith("_history")} <= names
    assert con.execute("select count(*) from metrics").fetchone() == (0,)
    assert "ce_loss_score" in [d[0] for d in con.execute("select * from metrics").description]


def test_rebuild_sees_new_parts_and_is_idempotent(tmp_path):
    synth.fill(tmp_path)
    first = catalog.query(tmp_path, "select count(*) as n from metrics")["n"][0]
    tables.append_rows(tmp_path, "metrics", [synth._metric(synth.BASE, synth.BASE, "excluded", 0.5, segment="rollout")])
    catalog.build_catalog(tmp_path)
    catalog.build_catalog(tmp_path)
    assert catalog.query(tmp_path, "select count(*) as n from metrics")["n"][0] == first + 1
    assert catalog.query(tmp_path, "select count(*) as n from metrics_history")["n"][0] == first + 1


def test_training_log_rows_carry_their_run_folder(tmp_path):
    synth.fill(tmp_path)
    df = catalog.query(tmp_path, "select distinct sae_id from training_log")
    assert df["sae_id"].tolist() == ["base-sae"]


@pytest.mark.parametrize("name", sorted(p.stem for p in catalog.SQL_DIR.glob("*.sql")))
def test_every_report_query_runs_on_filled_and_empty_results(tmp_path, name):
    params = [synth.BASE, synth.CHAT, 100]
    import re

    n = max((int(i) for i in re.findall(r"\?(\d+)", catalog.load_query(name))), default=0)
    empty = catalog.query(tmp_path / "empty", catalog.load_query(name), params[:n])
    assert len(empty) == 0
    synth.fill(tmp_path / "full")
    full = catalog.query(tmp_path / "full", catalog.load_query(name), params[:n])
    assert len(full) > 0


def test_transfer_table_labels_and_values(tmp_path):
    synth.fill(tmp_path)
    df = catalog.query(tmp_path, catalog.load_query("transfer_table"), [synth.BASE, synth.CHAT])
    excluded = df[df.outlier_policy == "excluded"].set_index(["sae", "model"])
    assert excluded.loc[("base", "chat"), "ce_loss_rec_pct"] == pytest.approx(93.0)
    assert excluded.loc[("fine-tuned base", "chat"), "ce_loss_rec_pct"] == pytest.approx(96.0)
    assert len(df) == 10  # 5 (SAE, model) pairs x 2 policies, checkpoints left out


def test_values_are_bound_not_formatted(tmp_path):
    synth.fill(tmp_path)
    hostile = "x'); drop view metrics; --"
    df = catalog.query(tmp_path, catalog.load_query("transfer_table"), [hostile, synth.CHAT])
    assert "base" not in set(df["sae"])
    assert catalog.query(tmp_path, "select count(*) as n from metrics")["n"][0] > 0
