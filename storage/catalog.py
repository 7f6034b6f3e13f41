"""The DuckDB catalog: views over a study's Parquet tables, rebuilt idempotently.

Parquet stays the source of truth. `build_catalog` writes `study.duckdb` next to the tables
with two views per table, generated from the table's declared result key
(`sae_transfer.storage.result_keys`): `<table>` holds the current results (one row per key, or
every row of each computation's newest write; equal to the history for logs) and
`<table>_history` every row ever appended. A table with no parts yet gets views over a zero-row
stub carrying its declared schema, so queries and reports never fail on a missing table. The database is
built under a temporary name and renamed into place, so concurrent builders never leave a
half-built file and open readers keep a consistent one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from sae_transfer.storage.layout import StudyLayout
from sae_transfer.storage.result_keys import ResultKey

SQL_DIR = Path(__file__).parent / "sql"


def _table_sources() -> dict[str, tuple[str, pa.Schema | None, ResultKey]]:
    """View name -> (glob relative to the results root, declared schema or None, result key)."""
    from sae_transfer.storage import study_tables, tables

    sources = {name: (f"{name}/part-*.parquet", schema) for name, schema in tables.SCHEMAS.items()}
    sources.update(study_tables.SOURCES)
    missing = sorted(set(sources) - set(tables.KEYS))
    if missing:
        raise KeyError(f"tables without a result key in KEYS: {missing}")
    return {name: (pattern, schema, tables.KEYS[name]) for name, (pattern, schema) in sources.items()}


HISTORY_SUFFIX = "_history"

# Models are named by Hub id or local folder; SAE metadata may keep only the folder's name.
# Report queries compare models by their last path component, and label SAEs and models
# base / chat / fine-tuned base, through these macros.
_MACROS = """
CREATE OR REPLACE MACRO model_name(m) AS regexp_extract(rtrim(m, '/'), '[^/]+$');
CREATE OR REPLACE MACRO same_model(a, b) AS model_name(a) = model_name(b);
CREATE OR REPLACE MACRO sae_label(sae_model, finetuned_from, base, chat) AS CASE
    WHEN finetuned_from IS NOT NULL THEN 'fine-tuned base'
    WHEN same_model(sae_model, base) THEN 'base'
    WHEN same_model(sae_model, chat) THEN 'chat'
    ELSE sae_model END;
CREATE OR REPLACE MACRO dictionary_label(dictionary, dictionary_model, base, chat) AS CASE
    WHEN same_model(dictionary_model, base) AND dictionary LIKE 'finetuned%' THEN 'fine-tuned base'
    WHEN same_model(dictionary_model, base) THEN 'base'
    WHEN same_model(dictionary_model, chat) THEN 'chat'
    ELSE dictionary END;
CREATE OR REPLACE MACRO model_label(model_id, base, chat) AS CASE
    WHEN same_model(model_id, base) THEN 'base'
    WHEN same_model(model_id, chat) THEN 'chat'
    ELSE model_id END;
"""


def _quote(text: str) -> str:
    """A SQL string literal. DuckDB cannot bind parameters inside DDL, so view paths are
    the one place a value is quoted into SQL; they come from our own layout, never user SQL."""
    return "'" + text.replace("'", "''") + "'"


def _stub(layout: StudyLayout, name: str, schema: pa.Schema) -> Path:
    path = layout.schema_stubs / f"{name}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}.parquet")
        pq.write_table(schema.empty_table(), tmp)
        os.replace(tmp, path)
    return path


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _current_filter(key: ResultKey, has_created_at: bool) -> str | None:
    """QUALIFY clause keeping the current rows of `key` (None: every row), over a source read
    with `filename` (the part) and `file_row_number` (the row's position in it)."""
    if key.kind == "log":
        return None
    partition = ", ".join(_ident(c) for c in key.columns)
    newest = (["created_at DESC NULLS LAST"] if has_created_at else []) + ["filename DESC"]
    if key.kind == "row":
        order = ", ".join(newest + ["file_row_number DESC"])
        return f"QUALIFY row_number() OVER (PARTITION BY {partition} ORDER BY {order}) = 1"
    if key.kind == "computation":
        # the part holding the computation's newest row is its newest write: keep all of its rows
        order = ", ".join(newest)
        return f"QUALIFY filename = first_value(filename) OVER (PARTITION BY {partition} ORDER BY {order})"
    raise ValueError(f"unknown result key kind {key.kind!r}")


def view_statements(layout: StudyLayout, name: str, pattern: str, schema: pa.Schema | None,
                    key: ResultKey) -> list[str]:
    """CREATE VIEW statements of one table (`<name>_history`, then `<name>`); none when it has
    neither parts nor a schema."""
    from sae_transfer.storage.study_tables import RUN_FOLDER_COLUMN

    has_parts = any(layout.root.glob(pattern))
    if has_parts:
        path = layout.root.resolve() / pattern
        source = f"read_parquet({_quote(str(path))}, union_by_name=true, filename=true, file_row_number=true)"
    elif schema is not None:
        path = _stub(layout, name, schema).resolve()
        source = f"read_parquet({_quote(str(path))}, filename=true, file_row_number=true)"
    else:
        return []
    columns = "* EXCLUDE (filename, file_row_number)"
    run_column = RUN_FOLDER_COLUMN.get(name)
    if has_parts and run_column:
        run_name = _quote(StudyLayout.run_name_regex())
        columns = f"regexp_extract(filename, {run_name}, 1) AS {_ident(run_column)}, {columns}"
    current = _current_filter(key, schema is not None and "created_at" in schema.names)
    history = f"CREATE OR REPLACE VIEW {_ident(name + HISTORY_SUFFIX)} AS SELECT {columns} FROM {source}"
    view = f"CREATE OR REPLACE VIEW {_ident(name)} AS SELECT {columns} FROM {source}" + (f" {current}" if current else "")
    return [history, view]


def build_catalog(results_dir: str | Path) -> Path:
    """(Re)build `study.duckdb` with the current-results and history views of every result table;
    returns its path."""
    layout = StudyLayout(Path(results_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    tmp = layout.root / f".tmp-catalog-{uuid.uuid4().hex}.duckdb"
    con = duckdb.connect(str(tmp))
    try:
        con.execute(_MACROS)
        for name, (pattern, schema, key) in sorted(_table_sources().items()):
            for statement in view_statements(layout, name, pattern, schema, key):
                con.execute(statement)
    finally:
        con.close()
    os.replace(tmp, layout.catalog)
    return layout.catalog


def connect(results_dir: str | Path, *, rebuild: bool = True) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the study's catalog (rebuilt first so new parts are seen)."""
    layout = StudyLayout(Path(results_dir))
    if rebuild or not layout.catalog.exists():
        build_catalog(layout.root)
    return duckdb.connect(str(layout.catalog), read_only=True)


def load_query(name: str) -> str:
    """The text of `storage/sql/<name>.sql`."""
    return (SQL_DIR / f"{name}.sql").read_text()


def query(results_dir: str | Path, sql: str, params: list | None = None, *, con=None):
    """Run SQL (values bound as parameters) on the catalog; returns a pandas DataFrame."""
    own = con is None
    con = con or connect(results_dir)
    try:
        return con.execute(sql, params or []).df()
    finally:
        if own:
            con.close()
