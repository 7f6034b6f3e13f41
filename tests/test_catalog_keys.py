"""Catalog views keep the current result per declared key; `<table>_history` keeps every row."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from sae_transfer.storage import catalog, tables
from sae_transfer.storage.result_keys import ResultKey
from tests import _synthetic_results as synth

REPO = Path(__file__).resolve().parents[1]


def _q(root, sql: str):
    return catalog.query(root, sql)


def _one(root, sql: str):
    return _q(root, sql).iloc[0].tolist()


def _errors(sae: str, n: int, value: float, **extra) -> list[dict]:
    return [dict(sae_id=sae, sae_model=synth.BASE, model_id=synth.CHAT, model_revision="sha256:x", hook=synth.HOOK,
                 seq_id=i // 4, pos=i % 4, scaled_norm=value + i, sq_error=value, l0=3, **extra) for i in range(n)]


def _rerun(source: Path, target: Path, names) -> None:
    """Append every row of `names` in `source` to `target` again, stamped now (a re-run)."""
    stamp = tables.now_utc()
    for name in names:
        t = tables.read_table(source, name)
        if t.num_rows:
            t = t.set_column(t.schema.get_field_index("created_at"), "created_at",
                             pa.array([stamp] * t.num_rows, tables.SCHEMAS[name].field("created_at").type))
            tables.append_rows(target, name, t)


def test_every_view_has_a_key_on_its_own_columns():
    sources = catalog._table_sources()
    assert set(sources) == set(tables.KEYS)
    for name, (_, schema, key) in sources.items():
        assert isinstance(key, ResultKey) and key.kind in ("row", "computation", "log"), name
        if key.kind == "log":
            assert not key.columns and not key.index, name
            continue
        assert key.columns and schema is not None and "created_at" in schema.names, name
        assert set(key.columns + key.index) <= set(schema.names), (name, set(key.columns + key.index) - set(schema.names))
        assert (key.kind == "computation") == bool(key.index), name


def test_rerun_of_a_key_shows_only_the_newest_and_history_keeps_both(tmp_path):
    old = synth._metric(synth.BASE, synth.CHAT, "excluded", 0.5)
    new = dict(old, ce_loss_score=0.9, outlier_threshold=20.0)  # a re-run with a changed setting
    tables.append_rows(tmp_path, "metrics", [old])
    tables.append_rows(tmp_path, "metrics", [new])
    assert _one(tmp_path, "select count(*), avg(ce_loss_score), any_value(outlier_threshold) from metrics") == [1, 0.9, 20.0]
    assert _one(tmp_path, "select count(*), avg(ce_loss_score) from metrics_history") == [2, pytest.approx(0.7)]


def test_newest_is_by_created_at_then_part_order(tmp_path):
    row = synth._metric(synth.BASE, synth.CHAT, "excluded", 0.5)
    now = tables.now_utc()
    # written later but created earlier: created_at decides
    tables.append_rows(tmp_path, "metrics", [dict(row, ce_loss_score=0.8, created_at=now)])
    tables.append_rows(tmp_path, "metrics", [dict(row, ce_loss_score=0.1, created_at=now - dt.timedelta(hours=1))])
    assert _one(tmp_path, "select count(*), avg(ce_loss_score) from metrics") == [1, 0.8]
    # same created_at: the later part wins, and within one part the later row
    tables.append_rows(tmp_path, "metrics", [dict(row, ce_loss_score=0.6, created_at=now)])
    assert _one(tmp_path, "select count(*), avg(ce_loss_score) from metrics") == [1, 0.6]
    tables.append_rows(tmp_path, "metrics", [dict(row, ce_loss_score=s, created_at=now) for s in (0.2, 0.3)])
    assert _one(tmp_path, "select count(*), avg(ce_loss_score) from metrics") == [1, 0.3]
    assert _one(tmp_path, "select count(*) from metrics_history") == [5]


def test_distinct_keys_are_all_kept(tmp_path):
    row = synth._metric(synth.BASE, synth.CHAT, "excluded", 0.5)
    tables.append_rows(tmp_path, "metrics", [row])
    tables.append_rows(tmp_path, "metrics", [dict(row, model_revision="step-30"), dict(row, segment="rollout"),
                                             dict(row, outlier_policy="included"), dict(row, sae_id="other:1")])
    assert _one(tmp_path, "select count(*) from metrics") == [5]
    assert _one(tmp_path, "select count(*) from metrics_history") == [5]


def test_rerun_of_a_per_token_table_replaces_all_of_the_older_runs_rows(tmp_path):
    tables.append_rows(tmp_path, "token_errors", _errors("base-sae:abc", 10, 1.0))  # first run: 10 tokens
    tables.append_rows(tmp_path, "token_errors", _errors("chat-sae:abc", 6, 5.0))  # another SAE: kept throughout
    tables.append_rows(tmp_path, "token_errors", _errors("base-sae:abc", 4, 2.0))  # re-run on 4 tokens
    df = _q(tmp_path, "select sae_id, count(*) as n, min(sq_error) as lo, max(sq_error) as hi from token_errors "
                      "group by sae_id order by sae_id")
    assert df.values.tolist() == [["base-sae:abc", 4, 2.0, 2.0], ["chat-sae:abc", 6, 5.0, 5.0]]
    assert _one(tmp_path, "select count(*) from token_errors_history") == [20]
    # no two rows of one computation share the index
    assert _one(tmp_path, "select count(*) - count(distinct (sae_id, seq_id, pos)) from token_errors") == [0]


def test_per_latent_computation_keeps_every_row_of_its_newest_write(tmp_path):
    def stats(value):
        return [dict(dictionary="base-sae:abc", dictionary_model=synth.BASE, hook=synth.HOOK, model=m, model_id=m,
                     latent=j, frequency=value) for j in range(3) for m in ("base", "chat")]

    tables.append_rows(tmp_path, "latent_stats", stats(0.1))
    tables.append_rows(tmp_path, "latent_stats", stats(0.2)[:4])  # the re-run's SAE is narrower
    df = _q(tmp_path, "select model, latent, frequency from latent_stats order by latent, model")
    assert df.values.tolist() == [["base", 0, 0.2], ["chat", 0, 0.2], ["base", 1, 0.2], ["chat", 1, 0.2]]


def test_synthetic_rerun_does_not_double_count_and_every_report_query_is_unchanged(tmp_path):
    once, twice = tmp_path / "once", tmp_path / "twice"
    synth.fill(once)
    synth.fill(twice)
    names = [n for n in tables.SCHEMAS if n != "runs"]
    _rerun(once, twice, names)
    for name in names:
        n_once = _one(once, f"select count(*) from {name}")[0]
        assert _one(twice, f"select count(*) from {name}") == [n_once], name
        assert _one(twice, f"select count(*) from {name}_history") == [2 * n_once], name
    params = [synth.BASE, synth.CHAT, 100]
    for path in sorted(catalog.SQL_DIR.glob("*.sql")):
        sql = path.read_text()
        n = max((int(i) for i in re.findall(r"\?(\d+)", sql)), default=0)
        a, b = catalog.query(once, sql, params[:n]), catalog.query(twice, sql, params[:n])
        assert a.astype(str).values.tolist() == b.astype(str).values.tolist(), path.stem


def test_rerun_with_a_changed_setting_counts_each_metric_once(tmp_path):
    synth.fill(tmp_path)
    before = _one(tmp_path, "select count(*), avg(ce_loss_score) from metrics")
    rows = [dict(r, outlier_threshold=20.0, created_at=tables.now_utc())
            for r in tables.read_table(tmp_path, "metrics").to_pylist() if r["segment"] == "text"]
    tables.append_rows(tmp_path, "metrics", rows)
    assert _one(tmp_path, "select count(*), avg(ce_loss_score) from metrics") == [before[0], pytest.approx(before[1])]
    assert _one(tmp_path, "select count(*) from metrics_history") == [before[0] + len(rows)]
    assert _one(tmp_path, "select count(*) from metrics where segment = 'text' and outlier_threshold <> 20") == [0]


def test_sql_command_queries_the_history(tmp_path):
    synth.fill(tmp_path)
    row = synth._metric(synth.BASE, synth.CHAT, "excluded", 0.5)
    tables.append_rows(tmp_path, "metrics", [row])
    cmd = [sys.executable, "-c", "from sae_transfer.cli import main; main()", "sql",
           "select (select count(*) from metrics_history) as history, (select count(*) from metrics) as current",
           "--results", str(tmp_path), "--format", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"history": 19, "current": 18}]
