"""A study.duckdb answers from wherever it sits: any DuckDB client on a moved or copied folder."""

from __future__ import annotations

import shutil

import duckdb

from sae_transfer.storage import catalog, tables
from tests import _synthetic_results as synth

_QUERIES = (
    "select sae_model, model_id, outlier_policy, segment, ce_loss_score from metrics order by all",
    "select count(*) from metrics_history",
    "select sae_id, step, loss from training_log order by all",
    "select model_label(model_id, 'models/base', 'models/chat'), n_outliers from outlier_summary order by all",
    "select count(*) from latent_stats",
)


def _answers(con) -> list:
    return [con.execute(q).fetchall() for q in _QUERIES]


def test_moved_copy_opens_in_a_plain_duckdb_client(tmp_path, monkeypatch):
    original = tmp_path / "built-here" / "demo"
    synth.fill(original)
    with duckdb.connect(str(catalog.build_catalog(original)), read_only=True) as con:
        expected = _answers(con)
    assert expected[2] and expected[2][0][0] == "base-sae"  # run folder name, from the relative part path
    moved = tmp_path / "colleague" / "copy-of-demo"
    shutil.copytree(original, moved)
    shutil.rmtree(original)  # nothing of the old location is left to read
    monkeypatch.chdir(tmp_path)  # and the client runs from somewhere else
    with duckdb.connect(str(moved / "study.duckdb"), read_only=True) as con:
        assert _answers(con) == expected
        texts = " ".join(sql for (sql,) in con.execute("select sql from duckdb_views() where not internal").fetchall())
    assert "read_parquet" not in texts and str(tmp_path) not in texts  # no path in any view


def test_attached_catalog_answers_under_another_name(tmp_path):
    synth.fill(tmp_path)
    path = catalog.build_catalog(tmp_path)
    with duckdb.connect() as con:
        con.execute(f"attach '{path}' as study (read_only)")
        rows = con.execute("select count(*) from study.metrics").fetchone()[0]
    assert rows == catalog.query(tmp_path, "select count(*) as n from metrics")["n"][0] > 0


def test_unchanged_parts_are_not_rebuilt_and_new_parts_are_seen(tmp_path):
    synth.fill(tmp_path)
    path = catalog.build_catalog(tmp_path)
    stamp = path.stat().st_mtime_ns, path.stat().st_ino
    assert catalog.build_catalog(tmp_path) == path
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp  # nothing changed: not rewritten
    before = catalog.query(tmp_path, "select count(*) as n from token_errors_history")["n"][0]
    tables.append_rows(tmp_path, "metrics", [synth._metric(synth.BASE, synth.BASE, "excluded", 0.5, segment="rollout")])
    catalog.build_catalog(tmp_path)
    assert (path.stat().st_mtime_ns, path.stat().st_ino) != stamp
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("select count(*) from metrics where segment = 'rollout' and ce_loss_score = 0.5").fetchone() == (1,)
        assert con.execute("select count(*) from token_errors_history").fetchone() == (before,)  # copied table intact


def test_a_column_added_later_is_present_for_old_parts(tmp_path):
    old = tables.to_table("metrics", [synth._metric(synth.BASE, synth.CHAT, "excluded", 0.5)]).drop_columns(["variance_share"])
    folder = tmp_path / "metrics"
    folder.mkdir()
    import pyarrow.parquet as pq

    pq.write_table(old, folder / "part-0.parquet")  # a part written before the column existed
    df = catalog.query(tmp_path, "select variance_share, ce_loss_score from metrics")
    assert df["variance_share"].isna().all() and df["ce_loss_score"].tolist() == [0.5]
