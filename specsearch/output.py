"""One way to print or write a result table: table (rich), csv, json or parquet."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from .errors import SpecsearchError
from .store import write_parquet_atomic

FORMATS = ("table", "csv", "json", "parquet")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return str(value)


def emit_table(
    table: pa.Table, fmt: str = "table", output: Path | None = None, title: str | None = None
) -> None:
    """Print ``table`` to stdout (or write it to ``output``) in one of FORMATS."""
    if fmt not in FORMATS:
        raise SpecsearchError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "parquet":
        if output is None:
            raise SpecsearchError("--format parquet needs --output FILE")
        write_parquet_atomic(table, Path(output))
        return
    if fmt == "csv":
        flat = table.select(
            [c for c in table.column_names if not _is_nested(table.schema.field(c).type)]
        )
        sink = pa.BufferOutputStream()
        pacsv.write_csv(flat, sink)
        text = sink.getvalue().to_pybytes().decode()
    elif fmt == "json":
        rows = [{k: _json_value(v) for k, v in row.items()} for row in table.to_pylist()]
        text = json.dumps(rows, default=_json_default) + "\n"
    else:
        text = None
    if text is not None:
        if output is None:
            sys.stdout.write(text)
        else:
            Path(output).write_text(text)
        return
    from rich.console import Console
    from rich.table import Table

    view = Table(title=title, show_lines=False)
    for name in table.column_names:
        view.add_column(name, overflow="fold")
    for row in table.to_pylist():
        view.add_row(*[_cell(v) for v in row.values()])
    console = Console(file=open(output, "w") if output else None, width=200 if output else None)
    console.print(view)


def _is_nested(type_: pa.DataType) -> bool:
    return (
        pa.types.is_list(type_) or pa.types.is_fixed_size_list(type_) or pa.types.is_struct(type_)
    )


def _json_value(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _json_default(value: object) -> object:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
