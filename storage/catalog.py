"""The DuckDB catalog: a study's Parquet tables, materialised into `study.duckdb`.

Parquet stays the source of truth. `build_catalog` writes `study.duckdb` next to the tables
with two views per table, generated from the table's declared result key
(`sae_transfer.storage.result_keys`): `<table>` holds the current results (one row per key, or
every row of each computation's newest write; equal to the history for logs) and
`<table>_history` every row ever appended.

The views read tables stored inside the file (schema `parts`, one table per result table, each
row with the part it came from, relative to the results root, and its position there), not
`read_parquet` over paths: DuckDB resolves a path in a view against the working directory of
whoever opens the file, so views holding paths stop working the moment the folder is moved,
copied or synced down from a bucket. A materialised catalog answers from wherever it sits,
in any DuckDB client; it is a snapshot as of its last build, and every `sql`, `report` and
pipeline run rebuilds it first. A table whose parts have not changed since the last build is
copied from the previous file rather than decoded again; when nothing changed the build is a
listing and no write. A table with no parts yet gets its declared columns, so queries and
reports never fail on a missing table. The database is built under a temporary name and
renamed into place, so concurrent builders never leave a half-built file and open readers keep
a consistent one. On an object-store root the file is built in this machine's cache
(`sae_transfer.storage.store.local_cache_dir`), read from there, and uploaded whole to
`<root>/study.duckdb`; DuckDB reads the remote Parquet through the fsspec file system
registered with the connection (`register_filesystem`), so no DuckDB extension is needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa

from sae_transfer.storage.fingerprint import hash_payload
from sae_transfer.storage.layout import StudyLayout
from sae_transfer.storage.result_keys import ResultKey
from sae_transfer.storage.store import RemotePath, clean_leftovers, local_cache_dir, location

log = logging.getLogger(__name__)

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
    """A SQL string literal. DuckDB cannot bind parameters in ATTACH, so the previous catalog's
    path is the one value quoted into SQL; it comes from our own layout, never user SQL."""
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


PARTS_SCHEMA = "parts"  # the materialised rows: parts.<table>, plus the columns below
PART_COLUMN, ROW_COLUMN = "_part", "_row"  # part file (relative to the results root) and row in it
STATE_TABLE = "_catalog_state"  # (table, signature of its parts) of the last build, and "" -> whole


def _current_filter(key: ResultKey, has_created_at: bool) -> str | None:
    """QUALIFY clause keeping the current rows of `key` (None: every row), over rows carrying
    their part (`_part`) and their position in it (`_row`)."""
    if key.kind == "log":
        return None
    partition = ", ".join(_ident(c) for c in key.columns)
    newest = (["created_at DESC NULLS LAST"] if has_created_at else []) + [f"{PART_COLUMN} DESC"]
    if key.kind == "row":
        order = ", ".join(newest + [f"{ROW_COLUMN} DESC"])
        return f"QUALIFY row_number() OVER (PARTITION BY {partition} ORDER BY {order}) = 1"
    if key.kind == "computation":
        # the part holding the computation's newest row is its newest write: keep all of its rows
        order = ", ".join(newest)
        return f"QUALIFY {PART_COLUMN} = first_value({PART_COLUMN}) OVER (PARTITION BY {partition} ORDER BY {order})"
    raise ValueError(f"unknown result key kind {key.kind!r}")


def view_statements(name: str, schema: pa.Schema | None, key: ResultKey) -> list[str]:
    """CREATE VIEW statements of one table (`<name>_history`, then `<name>`) over `parts.<name>`."""
    from sae_transfer.storage.study_tables import RUN_FOLDER_COLUMN

    source = f"{PARTS_SCHEMA}.{_ident(name)}"
    columns = f"* EXCLUDE ({PART_COLUMN}, {ROW_COLUMN})"
    run_column = RUN_FOLDER_COLUMN.get(name)
    if run_column:
        run_name = "'" + StudyLayout.run_name_regex().replace("'", "''") + "'"
        columns = f"regexp_extract({PART_COLUMN}, {run_name}, 1) AS {_ident(run_column)}, {columns}"
    current = _current_filter(key, schema is not None and "created_at" in schema.names)
    history = f"CREATE OR REPLACE VIEW {_ident(name + HISTORY_SUFFIX)} AS SELECT {columns} FROM {source}"
    view = f"CREATE OR REPLACE VIEW {_ident(name)} AS SELECT {columns} FROM {source}" + (f" {current}" if current else "")
    return [history, view]


def _listing(root: Path | RemotePath, pattern: str) -> list[tuple[str, str, str]]:
    """(path DuckDB reads, path relative to the root, change stamp) of every part matching
    `pattern`, sorted; the stamp is size + mtime locally, size + ETag on a store."""
    if isinstance(root, RemotePath):
        found = root.fs.glob(f"{root.key}/{pattern}", detail=True)
        return sorted((f"{root.protocol}://{k}", k[len(root.key) + 1:], f"{i.get('size')}:{i.get('ETag', '')}")
                      for k, i in found.items())
    out = []
    for path in root.glob(pattern):
        try:
            stat = path.stat()
        except FileNotFoundError:  # replaced while listing
            continue
        out.append((str(path.resolve()), path.relative_to(root).as_posix(), f"{stat.st_size}:{stat.st_mtime_ns}"))
    return sorted(out)


def _signature(listing: list[tuple[str, str, str]], schema: pa.Schema | None, key: ResultKey) -> str:
    """What a materialised table depends on: its parts (names and stamps), its declared schema
    and key, and this module's source (a change in how tables are materialised rebuilds them)."""
    return hash_payload(_CODE, [(rel, stamp) for _, rel, stamp in listing], str(schema), repr(key))


_CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _load_table(con: duckdb.DuckDBPyConnection, name: str, listing: list, schema: pa.Schema | None) -> None:
    """Materialise `parts.<name>` from its Parquet parts (union by column name, plus the declared
    columns so a table written before a column existed still has it), or from the schema alone."""
    target = f"{PARTS_SCHEMA}.{_ident(name)}"
    stub = None
    if schema is not None:
        stub = f"_stub_{name}"
        con.register(stub, schema.empty_table())
    if listing:
        paths = [path for path, _, _ in listing]
        relative = {path: rel for path, rel, _ in listing}
        con.register(f"_rel_{name}", pa.table({"filename": list(relative), PART_COLUMN: list(relative.values())}))
        parts = (f"SELECT p.* EXCLUDE (filename, file_row_number), r.{PART_COLUMN}, p.file_row_number AS {ROW_COLUMN} "
                 f"FROM read_parquet(?, union_by_name=true, filename=true, file_row_number=true) p "
                 f"JOIN _rel_{name} r USING (filename)")
        with_stub = f" UNION ALL BY NAME SELECT * FROM {stub}" if stub else ""
        con.execute(f"CREATE TABLE {target} AS {parts}{with_stub}", [paths])
    elif stub:
        con.execute(f"CREATE TABLE {target} AS SELECT *, NULL::VARCHAR AS {PART_COLUMN}, "
                    f"NULL::BIGINT AS {ROW_COLUMN} FROM {stub}")
    else:
        return
    if stub:
        con.unregister(stub)


def _previous_state(con: duckdb.DuckDBPyConnection, old: Path) -> dict[str, str]:
    """Attach the previous catalog as `old` and return its per-table signatures ({} if unusable)."""
    try:
        con.execute(f"ATTACH {_quote(str(old))} AS old (READ_ONLY)")
        rows = con.execute(f"SELECT name, signature FROM old.main.{STATE_TABLE}").fetchall()
    except duckdb.Error:
        return {}
    return dict(rows)


def _read_state(path: Path) -> dict[str, str]:
    """Signatures recorded in the catalog file at `path` ({} when absent or unreadable)."""
    if not path.is_file():
        return {}
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            return dict(con.execute(f"SELECT name, signature FROM {STATE_TABLE}").fetchall())
    except duckdb.Error:
        return {}


def _connection(path: Path, root: Path | RemotePath, **kwargs) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that never fetches an extension; remote roots read through fsspec."""
    con = duckdb.connect(str(path), **kwargs)
    con.execute("SET autoinstall_known_extensions = false; SET autoload_known_extensions = false")
    if isinstance(root, RemotePath):
        con.register_filesystem(root.fs)
    return con


def _clean(root: Path | RemotePath) -> None:
    """Remove killed writers' leftovers (best effort: read-only credentials still query)."""
    try:
        clean_leftovers(root)
    except Exception as exc:  # cleaning is never worth failing a query for
        log.warning("could not clean leftovers under %s: %s", root, exc)


def catalog_file(results_dir: str | Path | RemotePath) -> Path:
    """The local catalog file of a results root: `<root>/study.duckdb`, or for an object-store
    root its copy in this machine's cache."""
    root = location(results_dir)
    if isinstance(root, RemotePath):
        return local_cache_dir("catalogs", root.url) / StudyLayout.CATALOG_FILE
    return StudyLayout(root).catalog


def build_catalog(results_dir: str | Path | RemotePath) -> Path:
    """(Re)build the catalog of every result table (see the module docstring); returns the local
    catalog file. Does nothing when no table changed since the last build."""
    root = location(results_dir)
    target = catalog_file(root)
    _clean(root)
    sources = _table_sources()
    listings = {name: _listing(root, pattern) for name, (pattern, _, _) in sources.items()}
    wanted = {name: _signature(listings[name], schema, key) for name, (_, schema, key) in sources.items()}
    wanted[""] = hash_payload(sorted(wanted.items()))
    if _read_state(target).get("") == wanted[""]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-catalog-{uuid.uuid4().hex}.duckdb")
    con = _connection(tmp, root)
    try:
        previous = _previous_state(con, target) if target.is_file() else {}
        con.execute(_MACROS)
        con.execute(f"CREATE SCHEMA {PARTS_SCHEMA}")
        for name, (_, schema, key) in sorted(sources.items()):
            if previous.get(name) == wanted[name]:
                con.execute(f"CREATE TABLE {PARTS_SCHEMA}.{_ident(name)} AS SELECT * FROM old.{PARTS_SCHEMA}.{_ident(name)}")
            else:
                _load_table(con, name, listings[name], schema)
            if not listings[name] and schema is None:
                continue
            for statement in view_statements(name, schema, key):
                con.execute(statement)
        con.execute(f"CREATE TABLE {STATE_TABLE} (name VARCHAR, signature VARCHAR)")
        con.executemany(f"INSERT INTO {STATE_TABLE} VALUES (?, ?)", sorted(wanted.items()))
        if previous:
            con.execute("DETACH old")
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise
    con.close()
    os.replace(tmp, target)
    if isinstance(root, RemotePath):
        try:
            StudyLayout(root).catalog.put_file(target)
        except Exception as exc:  # read-only credentials still query the local copy
            log.warning("could not upload the catalog to %s: %s", root, exc)
    return target


def connect(results_dir: str | Path | RemotePath, *, rebuild: bool = True) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the study's catalog (rebuilt first so new parts are seen)."""
    target = catalog_file(results_dir)
    if rebuild or not target.exists():
        build_catalog(results_dir)
    return duckdb.connect(str(target), read_only=True)


def load_query(name: str) -> str:
    """The text of `storage/sql/<name>.sql`."""
    return (SQL_DIR / f"{name}.sql").read_text()


def query(results_dir: str | Path | RemotePath, sql: str, params: list | None = None, *, con=None):
    """Run SQL (values bound as parameters) on the catalog; returns a pandas DataFrame."""
    own = con is None
    con = con or connect(results_dir)
    try:
        return con.execute(sql, params or []).df()
    finally:
        if own:
            con.close()
