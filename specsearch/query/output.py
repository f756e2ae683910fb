"""One way to write a result: table (rich), csv, json or parquet, to a file or a text stream.

`emit_relation` streams a DuckDB relation (the result of `specsearch sql`); `emit_table` sends an
Arrow table (search results, labels) through the same code, which reads either as Arrow record
batches (so a search never loads DuckDB). Nothing here writes to the terminal on its own: the
caller passes the stream (the CLI passes stdout).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SpecsearchError
from ..files import atomic_path

if TYPE_CHECKING:
    import duckdb

FORMATS = ("table", "csv", "json", "parquet")
MAX_TABLE_ROWS = 1000
"""Rows shown by the ``table`` format; the other formats write every row."""


def emit_table(
    table: pa.Table,
    fmt: str = "table",
    output: str | Path | None = None,
    title: str | None = None,
    stream: TextIO | None = None,
) -> int:
    """Write ``table`` to ``output`` or ``stream`` in one of FORMATS. Returns rows."""
    return _emit(table, fmt, output, title, stream)


def emit_relation(
    relation: duckdb.DuckDBPyRelation,
    fmt: str = "table",
    output: str | Path | None = None,
    title: str | None = None,
    stream: TextIO | None = None,
) -> int:
    """Stream a relation out, to the file ``output`` (written atomically) or else to the text
    ``stream``. table: a rich table (first MAX_TABLE_ROWS rows); csv, json; parquet: files only.
    Returns the number of rows."""
    import duckdb

    try:
        return _emit(relation, fmt, output, title, stream)
    except duckdb.Error as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise SpecsearchError(f"SQL: {lines[0].strip() if lines else type(err).__name__}") from None


def _emit(data, fmt: str, output, title: str | None, stream) -> int:
    """Write a relation or an Arrow table (see ``emit_relation``)."""
    if fmt not in FORMATS:
        raise SpecsearchError(f"--format {fmt!r} must be one of {', '.join(FORMATS)}")
    if fmt == "parquet" and output is None:
        raise SpecsearchError("--format parquet needs --output FILE")
    if output is None and stream is None:
        raise SpecsearchError("emit: give an output file or a stream")
    if fmt == "table":
        table, rows = rich_table(data, title)
        _print_rich(table, output, stream)
    elif fmt == "parquet":
        rows = _write_parquet(data, Path(output))
    elif fmt == "csv":
        rows = _write_text(data, output, stream, _write_csv)
    else:
        rows = _write_text(data, output, stream, _write_json)
    return rows


SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".json": "json",
    ".txt": "table",
}


def output_format(
    fmt: str | None, output: str | Path | None, store_root: Path | None = None
) -> str:
    """The format to write: ``fmt`` if given, else the one ``output``'s suffix names (an unknown
    suffix is an error), else "table" on the screen. ``output`` may not lie inside the store."""
    if output is not None and store_root is not None:
        target = Path(output).resolve()
        root = Path(store_root).resolve()
        if target == root or root in target.parents:
            raise SpecsearchError(f"{output}: -o may not write inside the store {store_root}")
    if fmt is not None:
        if fmt not in FORMATS:
            raise SpecsearchError(f"--format {fmt!r} must be one of {', '.join(FORMATS)}")
        return fmt
    if output is None:
        return "table"
    suffix = Path(output).suffix.lower()
    if suffix not in SUFFIXES:
        raise SpecsearchError(
            f"{output}: unknown suffix {suffix or '(none)'!r}; use one of "
            f"{', '.join(SUFFIXES)} or give --format"
        )
    return SUFFIXES[suffix]


def rows_summary(rows: int, output: str | Path | None = None, fmt: str = "table") -> str:
    """The one-line summary after a result: rows, where they went, what the screen omitted."""
    text = f"{rows:,} row{'s' if rows != 1 else ''}" + (f" written to {output}" if output else "")
    if fmt == "table" and output is None and rows > MAX_TABLE_ROWS:
        text += f" (first {MAX_TABLE_ROWS:,} shown)"
    return text


def _write_text(data, output, stream, writer) -> int:
    if output is not None:
        with atomic_path(Path(output)) as tmp:
            return writer(data, tmp)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch) / "result"
        rows = writer(data, tmp)
        with open(tmp, encoding="utf-8") as f:
            shutil.copyfileobj(f, stream)
    stream.flush()
    return rows


def _batches(data, batch_size: int = 65_536) -> pa.RecordBatchReader:
    """A relation or an Arrow table as Arrow record batches (written by pyarrow: the query's
    connection itself may not write files, see ``sql.connect``)."""
    if isinstance(data, pa.Table):
        return data.to_reader(max_chunksize=batch_size)
    return data.to_arrow_reader(batch_size=batch_size)


def _write_parquet(data, path: Path) -> int:
    reader = _batches(data)
    rows = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, reader.schema, compression="zstd") as f:
        for batch in reader:
            f.write_batch(batch)
            rows += batch.num_rows
    return rows


def _write_csv(data, path: Path) -> int:
    """CSV with a header, quoting only where a value needs it; nulls are empty; 32-bit floats
    written as short as they round-trip."""
    import numpy as np

    reader = _batches(data)
    single = [pa.types.is_float32(f.type) for f in reader.schema]
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(reader.schema.names)
        for batch in reader:
            for record in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                writer.writerow(
                    [
                        "" if v is None else (str(np.float32(v)) if short else _csv_cell(v))
                        for v, short in zip(record, single, strict=True)
                    ]
                )
            rows += batch.num_rows
    return rows


def _csv_cell(value):
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return json.dumps(_finite(value))
    return value


def _write_json(data, path: Path) -> int:
    """A JSON array of row objects; NaN and infinities become null."""
    rows = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for batch in _batches(data, 10_000):
            for record in batch.to_pylist():
                f.write(",\n" if rows else "\n")
                f.write(json.dumps(_finite(record), default=str))
                rows += 1
        f.write("\n]\n" if rows else "]\n")
    return rows


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def rich_table(data, title: str | None = None):
    """(a rich Table of the first MAX_TABLE_ROWS rows of a relation or an Arrow table, its row
    count)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text  # cells are data, never rich markup

    table = Table(title=title, show_header=True, header_style="bold", box=box.SIMPLE_HEAD)
    reader = _batches(data, 10_000)
    for name in reader.schema.names:
        table.add_column(Text(name), overflow="fold", no_wrap=name.endswith("id"))
    rows = 0
    for batch in reader:
        for record in batch.to_pylist():
            if rows < MAX_TABLE_ROWS:
                table.add_row(*(Text(_cell(record[name])) for name in batch.schema.names))
            rows += 1
    return table, rows


def arrow_rich_table(table: pa.Table, title: str | None = None):
    """A rich Table of an Arrow table (see ``rich_table``)."""
    return rich_table(table, title)[0]


def _print_rich(table, output, stream) -> None:
    from rich.console import Console

    if output is None:
        width = None if getattr(stream, "isatty", lambda: False)() else 160
        Console(file=stream, width=width).print(table)
    else:
        with atomic_path(Path(output)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            Console(file=f, width=200).print(table)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list):  # e.g. an embedding: its first values and its length
        head = ", ".join(f"{v:.4g}" if isinstance(v, float) else _cell(v) for v in value[:3])
        return f"[{head}, … ({len(value)})]" if len(value) > 3 else f"[{head}]"
    return str(value)
