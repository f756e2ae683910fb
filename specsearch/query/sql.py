"""DuckDB over the store: the store's Parquet as SQL views, plus any catalog attached by name.

Views (all always exist, so a query never fails only because a stage has not run yet; a view
over files that do not exist yet is empty, with the contract's key columns). The plain views hold
each star's *current* row (its latest release, see ``specsearch.store``); the ``*_history``
views hold every row of every release, for history and diffs:

``shards`` / ``shards_history``
    canonical rows (the shard files the manifest lists), without the spectrum arrays
    (``lrs_flux``, ``lrs_ivar``, ``xp_flux``, ``xp_flux_error``) unless ``with_arrays``;
    array-free queries then read no array bytes.
``embeddings`` / ``embeddings_history``
    one row per star and modality with ``release`` and ``modality``; ``embedding`` is a
    ``FLOAT[d]`` array, ready for ``array_cosine_similarity``.
``scores`` / ``scores_history``
    anomaly scores (``schema.SCORES_SCHEMA``). Empty: (source_id, release).
``neighbors``
    the kNN graph of the latest scoring of each release (source_id, modality, rank,
    neighbor_id, similarity, release).
``labels``
    predicted labels carried in the current embeddings (``pred_teff``, ``pred_logg``,
    ``pred_fe_h``, ``pred_alpha_m`` and their ``_err``): source_id, release, modality, model_id
    and those columns, for the rows that have a label.

``attach={"gaia": "gaia.fits"}`` adds a view ``gaia``: Parquet (file or folder), CSV/TSV, JSON,
FITS binary tables, ECSV and VOTable (the last three through astropy).

Read-only. The connection reads the store's folder and the attached files and nothing else
(DuckDB's external access is off, with those paths allowed, and its configuration locked), and
``query`` runs one SELECT (or EXPLAIN) statement: no COPY, ATTACH, INSTALL, CREATE or SET, so a
query cannot change the store or reach another file.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SpecsearchError
from ..schema import ARRAY_COLUMNS, LABELS, MODALITIES, SHARD_SCHEMA
from ..store import Store

VIEWS = (
    "shards",
    "shards_history",
    "embeddings",
    "embeddings_history",
    "scores",
    "scores_history",
    "neighbors",
    "labels",
)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_RE = re.compile(rf"^(pred_)?({'|'.join(LABELS)})(_err)?$")

_EMPTY = {
    "embeddings": "SELECT NULL::BIGINT AS source_id, NULL::VARCHAR AS release, NULL::VARCHAR AS modality, "
    "NULL::VARCHAR AS model_id, NULL::FLOAT[] AS embedding",
    "scores": "SELECT NULL::BIGINT AS source_id, NULL::VARCHAR AS release",
    "neighbors": "SELECT NULL::BIGINT AS source_id, NULL::VARCHAR AS modality, NULL::INTEGER AS rank, "
    "NULL::BIGINT AS neighbor_id, NULL::FLOAT AS similarity, NULL::VARCHAR AS release",
    "labels": "SELECT NULL::BIGINT AS source_id, NULL::VARCHAR AS release, NULL::VARCHAR AS modality, "
    "NULL::VARCHAR AS model_id, "
    + ", ".join(f"NULL::FLOAT AS pred_{name}{err}" for name in LABELS for err in ("", "_err")),
}


def connect(
    store: Store | str | os.PathLike,
    attach: dict[str, str | os.PathLike] | None = None,
    with_arrays: bool = False,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's views and the attached catalogs."""
    store = Store.open(store)
    con = duckdb.connect()
    releases = store.releases()
    con.sql("CREATE TABLE _release_rank (release VARCHAR, _rank INTEGER)")
    if releases:
        ranks = [(release, rank) for rank, release in enumerate(releases)]
        con.executemany("INSERT INTO _release_rank VALUES (?, ?)", ranks)
    _create_shards_views(con, store.shard_files() if releases else [], with_arrays)
    embedding_files = [p for m in MODALITIES for p in store.embedding_files(m)]
    _create_embeddings_views(con, embedding_files)
    _create_parquet_views(con, "scores", store.score_files(), multi=len(releases) > 1)
    _create_parquet_view(con, "neighbors", store.neighbor_files())
    _create_labels_view(con)
    allowed = [str(store.root.resolve())]
    for name, path in (attach or {}).items():
        attach_catalog(con, name, path)
        allowed.append(str(Path(path).resolve()))
    _lock_down(con, allowed)
    return con


def _lock_down(con: duckdb.DuckDBPyConnection, allowed: list[str]) -> None:
    """Only the store and the attached files are readable; the settings cannot be undone."""
    paths = [p for p in allowed if Path(p).is_file()]
    folders = [p.rstrip("/") + "/" for p in allowed if not Path(p).is_file()]
    con.execute("SET allowed_directories = ?", [folders])
    con.execute("SET allowed_paths = ?", [paths])
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _quote_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _file_list(files: list[Path]) -> str:
    return "[" + ", ".join(_quote_path(p) for p in files) + "]"


def _current_view(con: duckdb.DuckDBPyConnection, name: str, keys: str, multi: bool) -> None:
    """View ``name``: the rows of ``name_history`` that are current (latest release per key)."""
    if not multi:
        con.sql(f"CREATE VIEW {name} AS SELECT * FROM {name}_history")
        return
    con.sql(
        f"CREATE VIEW {name} AS SELECT h.* FROM {name}_history h JOIN _release_rank r "
        f"USING (release) QUALIFY r._rank = max(r._rank) OVER (PARTITION BY {keys})"
    )


def _create_shards_views(
    con: duckdb.DuckDBPyConnection, files: list[Path], with_arrays: bool
) -> None:
    if files:
        # the rows carry their own `release` column, so the folder names are not needed
        source = (
            f"read_parquet({_file_list(files)}, union_by_name = true, hive_partitioning = false)"
        )
        present = {row[0] for row in con.sql(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    else:
        con.register("_empty_shards", SHARD_SCHEMA.empty_table())
        source = "_empty_shards"
        present = set(SHARD_SCHEMA.names)
    arrays = [c for c in ARRAY_COLUMNS if c in present]
    exclude = f" EXCLUDE ({', '.join(arrays)})" if arrays and not with_arrays else ""
    con.sql(f"CREATE VIEW shards_history AS SELECT *{exclude} FROM {source}")
    multi = len({p.parent for p in files}) > 1
    _current_view(con, "shards", "h.source_id", multi)


def _create_embeddings_views(con: duckdb.DuckDBPyConnection, files: list[Path]) -> None:
    if not files:
        con.sql(f"CREATE VIEW embeddings_history AS {_EMPTY['embeddings']} WHERE false")
        con.sql("CREATE VIEW embeddings AS SELECT * FROM embeddings_history")
        return
    source = f"read_parquet({_file_list(files)}, union_by_name = true, hive_partitioning = true)"
    dims = {_embedding_dim(p) for p in files}
    # a fixed-size FLOAT[d] array is what DuckDB's array_* distance functions take
    cast = (
        f" REPLACE (embedding::FLOAT[{dims.pop()}] AS embedding)"
        if len(dims) == 1 and None not in dims
        else ""
    )
    con.sql(f"CREATE VIEW embeddings_history AS SELECT *{cast} FROM {source}")
    multi = len({p.parent.parent for p in files}) > 1
    _current_view(con, "embeddings", "h.source_id, h.modality", multi)


def _embedding_dim(path: Path) -> int | None:
    try:
        kind = pq.read_schema(path).field("embedding").type
    except (KeyError, pa.ArrowInvalid, OSError):
        return None
    return kind.list_size if pa.types.is_fixed_size_list(kind) else None


def _parquet_source(files: list[Path]) -> str:
    # score files carry their own `release` column
    return f"read_parquet({_file_list(files)}, union_by_name = true, hive_partitioning = false)"


def _create_parquet_view(con: duckdb.DuckDBPyConnection, name: str, files: list[Path]) -> None:
    if files:
        con.sql(f"CREATE VIEW {name} AS SELECT * FROM {_parquet_source(files)}")
    else:
        con.sql(f"CREATE VIEW {name} AS {_EMPTY[name]} WHERE false")


def _create_parquet_views(
    con: duckdb.DuckDBPyConnection, name: str, files: list[Path], multi: bool
) -> None:
    """``name_history`` over ``files`` and ``name``, its current rows."""
    if files:
        con.sql(f"CREATE VIEW {name}_history AS SELECT * FROM {_parquet_source(files)}")
    else:
        con.sql(f"CREATE VIEW {name}_history AS {_EMPTY[name]} WHERE false")
    _current_view(con, name, "h.source_id", multi and bool(files))


def _create_labels_view(con: duckdb.DuckDBPyConnection) -> None:
    columns = [row[0] for row in con.sql("DESCRIBE embeddings").fetchall()]
    labels = [c for c in columns if _LABEL_RE.match(c)]
    if not labels:
        con.sql(f"CREATE VIEW labels AS {_EMPTY['labels']} WHERE false")
        return
    keys = [c for c in ("source_id", "release", "modality", "model_id") if c in columns]
    # rows of files without predictions get null labels from union_by_name: leave them out
    con.sql(
        f"CREATE VIEW labels AS SELECT {', '.join(keys + labels)} FROM embeddings "
        f"WHERE coalesce({', '.join(labels)}) IS NOT NULL"
    )


# --- attached catalogs


def parse_attach(items: list[str]) -> dict[str, Path]:
    """``["gaia=cat.fits", ...]`` -> ``{"gaia": Path("cat.fits")}``, checking names and files."""
    attached: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not path:
            raise SpecsearchError(f"--attach {item!r}: expected NAME=PATH")
        attached[name] = Path(path)
    return attached


def attach_catalog(con: duckdb.DuckDBPyConnection, name: str, path: str | os.PathLike) -> None:
    """Make the table at ``path`` queryable as view ``name``; the format follows the suffix."""
    path = Path(path)
    if not _NAME_RE.match(name):
        raise SpecsearchError(f"--attach {name}={path}: the name must be letters, digits and '_'")
    if name.lower() in VIEWS:
        raise SpecsearchError(f"--attach {name}={path}: {name} is one of the store's views")
    if not path.exists():
        raise SpecsearchError(f"{path}: no such file or directory")
    suffix = Path(path.name.lower().removesuffix(".gz")).suffix
    if path.is_dir():
        source = f"read_parquet({_quote_path(path / '**' / '*.parquet')}, hive_partitioning = true)"
    elif suffix in (".parquet", ".pq"):
        source = f"read_parquet({_quote_path(path)})"
    elif suffix in (".csv", ".tsv", ".txt"):
        source = f"read_csv({_quote_path(path)}, auto_detect = true)"
    elif suffix in (".json", ".jsonl", ".ndjson"):
        source = f"read_json_auto({_quote_path(path)})"
    elif suffix in (".fits", ".fit", ".fts", ".ecsv", ".vot", ".votable", ".xml"):
        con.register(name, read_astropy_table(path))
        return
    else:
        raise SpecsearchError(f"{path}: unknown catalog format {suffix or '(no suffix)'!r}")
    try:
        con.sql(f"CREATE VIEW {name} AS SELECT * FROM {source}")
    except duckdb.Error as err:
        raise SpecsearchError(f"{path}: {_first_line(err)}") from None


def read_astropy_table(path: Path) -> pa.Table:
    """A FITS binary table (first table HDU), ECSV or VOTable as an Arrow table."""
    from astropy.table import Table

    suffix = Path(path.name.lower().removesuffix(".gz")).suffix
    fmt = {".ecsv": "ascii.ecsv", ".vot": "votable", ".votable": "votable", ".xml": "votable"}.get(
        suffix, "fits"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unit and multi-HDU chatter from astropy
            table = Table.read(path, format=fmt)
    except Exception as err:  # astropy raises many types for a bad file
        raise SpecsearchError(
            f"{path}: cannot read as a {fmt} table ({_first_line(err)})"
        ) from None
    return astropy_to_arrow(table)


def astropy_to_arrow(table) -> pa.Table:
    """Convert an astropy Table: masks become nulls, byte strings text, (n, ...) cells fixed lists.

    Mixin columns (Time, SkyCoord, Quantity with structure) become their string form.
    """
    from astropy.table import Column

    arrays = {}
    for name in table.colnames:
        column = table[name]
        if not isinstance(column, Column):
            arrays[name] = pa.array([str(value) for value in column])
            continue
        data = np.asarray(column)
        mask = np.ma.getmaskarray(column)
        if data.dtype.kind == "S":
            data = np.char.decode(data, "ascii", "replace")
        elif data.dtype.kind not in "UO":
            data = data.astype(data.dtype.newbyteorder("="))  # FITS is big-endian
        if data.ndim == 1:
            arrays[name] = pa.array(data, mask=mask if mask.any() else None)
        else:
            width = int(np.prod(data.shape[1:]))
            row_mask = mask.reshape(len(data), -1).all(axis=1)
            arrays[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(data.reshape(-1)),
                width,
                mask=pa.array(row_mask) if row_mask.any() else None,
            )
    return pa.table(arrays)


# --- running a query


READ_ONLY = ("StatementType.SELECT", "StatementType.EXPLAIN")


def query(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation | None:
    """Run one read-only statement (SELECT, incl. WITH/DESCRIBE/SHOW/SUMMARIZE, or EXPLAIN);
    anything else, and DuckDB's errors, become a one-line SpecsearchError."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise SpecsearchError(f"SQL: {_first_line(err)}") from None
    if len(statements) != 1:
        raise SpecsearchError(f"SQL: give one statement, not {len(statements)}")
    kind = str(statements[0].type)
    if kind not in READ_ONLY:
        raise SpecsearchError(
            f"SQL: specsearch sql is read-only: {kind.rsplit('.', 1)[-1]} statements are refused "
            "(use SELECT; -o FILE writes a result)"
        )
    try:
        return con.sql(sql)
    except duckdb.Error as err:
        raise SpecsearchError(f"SQL: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
