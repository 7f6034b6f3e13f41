"""Result tables: schemas, append-only part files, concurrent writers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from sae_transfer.storage.tables import SCHEMAS, append_rows, read_table, table_dir, to_table

WRITER = textwrap.dedent(
    """
    import sys
    from sae_transfer.storage.tables import append_rows
    out, tag = sys.argv[1], sys.argv[2]
    for i in range(25):
        rows = [{"param": f"{tag}-{i}-{j}", "layer": j, "rel_diff": 0.1 * j} for j in range(4)]
        append_rows(out, "weight_diff", rows)
    """
)


def test_rows_get_schema_defaults_and_read_back(tmp_path):
    assert read_table(tmp_path, "metrics").num_rows == 0
    assert read_table(tmp_path, "metrics").schema == SCHEMAS["metrics"]
    append_rows(tmp_path, "metrics", [{"sae_id": "a:1", "l0": 3.0, "n_tokens": 10}])
    append_rows(tmp_path, "metrics", [{"sae_id": "b:2", "segment": "rollout"}])
    table = read_table(tmp_path, "metrics")
    assert table.num_rows == 2 and table.schema == SCHEMAS["metrics"]
    rows = sorted(table.to_pylist(), key=lambda r: r["sae_id"])
    assert rows[0]["l0"] == 3.0 and rows[0]["segment"] is None and rows[0]["created_at"] is not None
    assert append_rows(tmp_path, "metrics", []) is None
    assert len(list(table_dir(tmp_path, "metrics").glob("part-*.parquet"))) == 2


def test_unknown_table_and_bad_types_fail(tmp_path):
    with pytest.raises(KeyError):
        append_rows(tmp_path, "nope", [{"a": 1}])
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, TypeError)):
        to_table("metrics", [{"l0": "not a number"}])


def test_two_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag]) for tag in ("p", "q")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    params = read_table(tmp_path, "weight_diff").column("param").to_pylist()
    expected = {f"{t}-{i}-{j}" for t in "pq" for i in range(25) for j in range(4)}
    assert len(params) == len(expected) and set(params) == expected
    folder = table_dir(tmp_path, "weight_diff")
    assert len(list(folder.glob("part-*.parquet"))) == 50 and not list(folder.glob(".tmp-*"))
