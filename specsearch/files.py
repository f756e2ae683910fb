"""Writing files safely: every file is written to a temporary name beside it and renamed into
place, so a reader sees the old file or the new one, never half of one.

Used by everything that writes: the store, the simulator, model and index saving, results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROWS_PER_FILE = 50_000
"""Stars per Parquet part file of a release (the store's shards, the simulator's output)."""

ROW_GROUP_SIZE = 4096
"""Rows per Parquet row group: small enough that an id lookup reads little."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; store files follow the umask
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How specsearch writes Parquet: zstd; dictionaries for scalar columns only (spectra never
    repeat, and trying a dictionary on them first makes writing several times slower); float
    arrays byte-stream-split, which makes them smaller and faster to read back."""
    split = {}
    for f in schema:
        if pa.types.is_nested(f.type) and f.type.value_type in (pa.float32(), pa.float64()):
            split[f"{f.name}.list.element"] = "BYTE_STREAM_SPLIT"
    return {
        "compression": "zstd",
        "use_dictionary": [f.name for f in schema if not pa.types.is_nested(f.type)],
        "column_encoding": split,
        "write_page_checksum": True,  # readers verify them (VERIFY): a flipped byte is an error
    }


VERIFY = {"page_checksum_verification": True}
"""Read options that check every Parquet page against its CRC (pq.read_table, pq.ParquetFile)."""


def verified_format():
    """A pyarrow dataset format that checks every page's CRC while scanning."""
    import pyarrow.dataset as ds

    return ds.ParquetFileFormat(
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)
    )


def write_parquet_atomic(table: pa.Table, path: Path, **kwargs: Any) -> Path:
    """Write a Parquet file atomically (temporary file, then rename), with ``parquet_options``
    unless told otherwise."""
    kwargs = parquet_options(table.schema) | kwargs
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def write_json_atomic(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class PartWriter:
    """Streams tables into ``part-00000.parquet``, ``part-00001.parquet``, ... of up to
    ``rows_per_file`` rows each (row groups of up to ``row_group_size``), with the project's
    Parquet options. Each part is written to a temporary file and renamed into place when it is
    full or on ``close``; ``abort`` removes the part being written. Memory holds one table."""

    def __init__(
        self,
        out_dir: Path,
        rows_per_file: int = ROWS_PER_FILE,
        row_group_size: int = ROW_GROUP_SIZE,
    ):
        self.out_dir = Path(out_dir)
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        self.files: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._stack: contextlib.ExitStack | None = None
        self._schema: pa.Schema | None = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self._writer is None or self._rows >= self.rows_per_file:
                self._open_part(table.schema)
            take = min(table.num_rows - start, self.rows_per_file - self._rows)
            part = table.slice(start, take)
            if part.schema != self._schema:
                part = part.cast(self._schema)
            self._writer.write_table(part, row_group_size=self.row_group_size)
            self._rows += take
            start += take

    def _open_part(self, schema: pa.Schema) -> None:
        self._close_part()
        path = self.out_dir / f"part-{len(self.files):05d}.parquet"
        self.files.append(path)
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(path))
        self._schema = schema
        self._writer = pq.ParquetWriter(tmp, schema, **parquet_options(schema))
        self._rows = 0

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stack.close()  # renames the temporary file into place
            self._writer = None

    def close(self) -> list[Path]:
        """Finish the last part; returns every part written."""
        self._close_part()
        return self.files

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            with contextlib.suppress(Exception):  # atomic_path removes the temporary file
                self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._writer = None
