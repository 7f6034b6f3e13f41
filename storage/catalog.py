"""The DuckDB catalog: views over a study's Parquet tables, rebuilt idempotently.

Parquet stays the source of truth. `build_catalog` writes `study.duckdb` next to the tables
with one view per table; a table with no parts yet gets a view over a zero-row stub carrying
its declared schema, so queries and reports never fail on a missing table. The database is
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

SQL_DIR = Path(__file__).parent / "sql"


def _table_sources() -> dict[str, tuple[str, pa.Schema | None]]:
    """View name -> (glob relative to the results root, declared schema or None)."""
    from sae_transfer.storage import study_tables, tables

    sources = {name: (f"{name}/part-*.parquet", schema) for name, schema in tables.SCHEMAS.items()}
    sources.update(study_tables.SOURCES)
    return sources


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


def view_sql(layout: StudyLayout, name: str, pattern: str, schema: pa.Schema | None) -> str | None:
    """CREATE VIEW statement for one table, or None when it has neither parts nor a schema."""
    from sae_transfer.storage.study_tables import RUN_FOLDER_COLUMN

    run_column = RUN_FOLDER_COLUMN.get(name)
    if any(layout.root.glob(pattern)) and run_column:
        files, run_name = _quote(str(layout.root.resolve() / pattern)), _quote(StudyLayout.run_name_regex())
        return (
            f'CREATE OR REPLACE VIEW "{name}" AS SELECT regexp_extract(filename, {run_name}, 1) AS "{run_column}", '
            f"* EXCLUDE (filename) FROM read_parquet({files}, union_by_name=true, filename=true)"
        )
    if any(layout.root.glob(pattern)):
        source = f"read_parquet({_quote(str(layout.root.resolve() / pattern))}, union_by_name=true)"
    elif schema is not None:
        source = f"read_parquet({_quote(str(_stub(layout, name, schema).resolve()))})"
    else:
        return None
    return f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM {source}'


def build_catalog(results_dir: str | Path) -> Path:
    """(Re)build `study.duckdb` with one view per result table; returns its path."""
    layout = StudyLayout(Path(results_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    tmp = layout.root / f".tmp-catalog-{uuid.uuid4().hex}.duckdb"
    con = duckdb.connect(str(tmp))
    try:
        con.execute(_MACROS)
        for name, (pattern, schema) in sorted(_table_sources().items()):
            statement = view_sql(layout, name, pattern, schema)
            if statement:
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
