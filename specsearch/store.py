"""The store: one directory holding everything derived for one survey.

Layout::

    STORE/manifest.json
    STORE/shards/release=DR1/part-00000.parquet      canonical rows
    STORE/shards/release=DR1/rejects.parquet         rows that could not be used, with a reason
    STORE/embeddings/release=DR1/modality=xp/...     (embed stage)
    STORE/indexes/  STORE/scores/  STORE/reports/

Every file is written to a temporary name in the same directory and renamed into place; the
manifest is written last, so a killed run leaves either the old state or the new one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .errors import SpecsearchError
from .schema import REJECTS_SCHEMA, SHARD_SCHEMA

MANIFEST = "manifest.json"
STORE_FORMAT = 1
SUBDIRS = ("shards", "embeddings", "indexes", "scores", "reports")
_RELEASE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_release(release: str) -> str:
    """A release name is used as a partition directory: letters, digits, '_', '.', '-' only."""
    if not release or not _RELEASE_RE.match(release):
        raise SpecsearchError(f"release name {release!r} must be letters, digits, '_', '.' or '-'")
    return release


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
    """How the store writes Parquet: zstd; dictionaries for scalar columns only (spectra never
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
    }


def write_parquet_atomic(table: pa.Table, path: Path, **kwargs: Any) -> Path:
    """Write a Parquet file atomically (temporary file, then rename), with ``parquet_options``
    unless told otherwise."""
    kwargs = parquet_options(table.schema) | kwargs
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def write_json_atomic(obj: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


class PartWriter:
    """Streams tables into ``part-00000.parquet``, ``part-00001.parquet``, ... of up to
    ``rows_per_file`` rows each (row groups of up to ``row_group_size``), with the store's
    Parquet options. Each part is written to a temporary file and renamed into place when it is
    full or on ``close``; ``abort`` removes the part being written. Memory holds one table."""

    def __init__(self, out_dir: Path, rows_per_file: int, row_group_size: int = 4096):
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


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Store:
    """A specsearch store rooted at ``root``. Creating one makes the layout if it is missing."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root)
        if not (self.root / MANIFEST).exists():
            if not create:
                raise SpecsearchError(f"{self.root}: not a specsearch store (no {MANIFEST})")
            for sub in SUBDIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self.write_manifest(
                {"format": STORE_FORMAT, "created": _now(), "releases": {}, "models": {}}
            )

    # --- manifest
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise SpecsearchError(f"{self.manifest_path}: corrupt manifest ({err.msg})") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = _now()
        write_json_atomic(manifest, self.manifest_path)

    def update_manifest(self, section: str, key: str, value: Any) -> None:
        manifest = self.read_manifest()
        manifest.setdefault(section, {})[key] = value
        self.write_manifest(manifest)

    # --- paths
    def shard_dir(self, release: str) -> Path:
        return self.root / "shards" / f"release={check_release(release)}"

    def embedding_dir(self, release: str, modality: str) -> Path:
        return (
            self.root / "embeddings" / f"release={check_release(release)}" / f"modality={modality}"
        )

    def index_dir(self) -> Path:
        return self.root / "indexes"

    def releases(self) -> list[str]:
        """Releases with ingested shards, in the order they were added."""
        # JSON objects keep their insertion order
        recorded = list(self.read_manifest().get("releases", {}))
        return [r for r in recorded if self.shard_dir(r).exists()]

    # --- shards
    def write_release(
        self,
        release: str,
        tables: Iterable[pa.Table],
        rejects: pa.Table | Callable[[], pa.Table] | None = None,
        sources: list[str] | None = None,
        rows_per_file: int = 50_000,
    ) -> dict[str, Any]:
        """Write one release's canonical shards (replacing any earlier write of that release).

        ``tables`` follow SHARD_SCHEMA, in order, and may be a generator: they are streamed into
        part files of ``rows_per_file`` rows (row groups of 4096, or each table's own size when
        smaller), so memory holds one table at a time. ``rejects`` may be a function, called once
        ``tables`` is exhausted (a streaming writer learns of rejects as it goes). Returns the
        manifest entry for the release.
        """
        out_dir = self.shard_dir(release)
        out_dir.mkdir(parents=True, exist_ok=True)
        # the new files go to a staging folder first, so a write that fails or is killed
        # part-way leaves the release as it was (a killed write's staging folder is removed by
        # the next one); then each is renamed into place, and the manifest comes last
        for stale in out_dir.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
        writer = PartWriter(staging, rows_per_file)
        try:
            for table in tables:
                writer.write(table)
            staged = writer.close()
            if not staged:  # an empty release still has one (empty) part
                staged = [
                    write_parquet_atomic(SHARD_SCHEMA.empty_table(), staging / "part-00000.parquet")
                ]
            if callable(rejects):
                rejects = rejects()
            rejects = rejects if rejects is not None else REJECTS_SCHEMA.empty_table()
            write_parquet_atomic(rejects, staging / "rejects.parquet")
            files = [out_dir / path.name for path in staged]
            for path in [*staged, staging / "rejects.parquet"]:
                os.replace(path, out_dir / path.name)
        except BaseException:
            writer.abort()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        keep = {p.name for p in files}
        for old in out_dir.glob("part-*.parquet"):
            if old.name not in keep:
                old.unlink()
        entry = {
            "rows": sum(pq.ParquetFile(p).metadata.num_rows for p in files),
            "rejects": rejects.num_rows,
            "files": {p.name: file_sha256(p) for p in files},
            "sources": sources or [],
            "ingested": _now(),
        }
        self.update_manifest("releases", release, entry)
        return entry

    def shard_files(self, release: str | None = None) -> list[Path]:
        """The shard files the manifest lists (all releases, or one): never a stray or stale file."""
        releases = [release] if release else self.releases()
        if not releases:
            raise SpecsearchError(f"{self.root}: the store has no ingested release")
        entries = self.read_manifest().get("releases", {})
        paths = []
        for rel in releases:
            if rel not in entries:
                raise SpecsearchError(f"{self.root}: release {rel} is not in the store")
            found = [self.shard_dir(rel) / name for name in sorted(entries[rel]["files"])]
            missing = [p.name for p in found if not p.exists()]
            if not found or missing:
                what = f"shard {missing[0]} is missing" if missing else "has no shards"
                raise SpecsearchError(f"{self.root}: release {rel} {what} (re-run ingest)")
            paths += found
        return paths

    def shards(self, release: str | None = None) -> ds.Dataset:
        """The canonical rows as an Arrow dataset (all releases, or one)."""
        paths = [str(p) for p in self.shard_files(release)]
        return ds.dataset(paths, format="parquet", schema=pq.read_schema(paths[0]))

    def rejects(self, release: str | None = None) -> pa.Table:
        releases = [release] if release else self.releases()
        tables = [
            pq.read_table(self.shard_dir(r) / "rejects.parquet")
            for r in releases
            if (self.shard_dir(r) / "rejects.parquet").exists()
        ]
        return pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()

    def iter_shard_batches(
        self, release: str | None = None, columns: list[str] | None = None, batch_size: int = 1024
    ) -> Iterator[pa.RecordBatch]:
        """Stream canonical rows in record batches of at most ``batch_size`` rows."""
        yield from self.shards(release).to_batches(columns=columns, batch_size=batch_size)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
