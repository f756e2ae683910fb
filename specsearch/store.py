"""The store: one directory holding everything derived for one survey, and the only code that
knows its layout.

Layout::

    STORE/manifest.json                                    the commit point (see below)
    STORE/shards/release=R/part-00000.parquet              canonical rows (schema.SHARD_SCHEMA)
    STORE/shards/release=R/rejects.parquet                 rows that could not be used, with a reason
    STORE/embeddings/release=R/modality=M/part-*.parquet   embed stage (schema.embedding_schema)
    STORE/indexes/<modality>.faiss + .json                 FAISS indexes (specsearch.indexes)
    STORE/scores/release=R/scores.parquet                  anomaly scores (schema.SCORES_SCHEMA)
    STORE/scores/release=R/neighbors.parquet               kNN graph (schema.NEIGHBORS_SCHEMA)
    STORE/scores/reference.json                            the frozen calibration of the scores
    STORE/reports/release=R/                               nightly reports
    STORE/marks/marks.parquet                              the users' triage marks
    STORE/.scratch/                                        work folders of running stages

Every file is written to a temporary name in the same directory and renamed into place; the
manifest is written last, so a killed run leaves either the old state or the new one. Readers
trust only the files the manifest lists, and only as the manifest recorded them: each file's
size and modification time are checked before it is read (a file replaced, truncated or written
over since is an error naming it and the command that rebuilds it), Parquet pages carry
checksums that readers verify, and ``specsearch check`` compares every SHA-256.

One writer at a time: the stages that change a store hold its lock (``Store.writing``, an
``fcntl`` lock on ``STORE/.lock``) for their whole run; a second writer waits for it (or, with
``--no-wait``, fails at once). Readers need no lock: they see the last committed manifest.

**A star seen in several releases.** Releases are ordered as they were first ingested. A star's
*current* row is its row from the latest release that holds it (for embeddings: the latest
release that holds that modality of it). Search, predict, the indexes and the SQL views use the
current rows; the rows of earlier releases stay readable with ``release=...`` or
``history=True``, for history and diffs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .errors import SpecsearchError
from .files import (
    ROWS_PER_FILE,
    VERIFY,
    PartWriter,
    file_sha256,
    verified_format,
    write_json_atomic,
    write_parquet_atomic,
)
from .schema import (
    MARKS_SCHEMA,
    MODALITIES,
    REJECTS_SCHEMA,
    SHARD_SCHEMA,
    check_modality,
    check_release,
)

MANIFEST = "manifest.json"
LOCK = ".lock"
STORE_FORMAT = 1
MANIFEST_SECTIONS = {
    "releases": dict,
    "embeddings": dict,
    "indexes": dict,
    "scores": dict,
    "reports": dict,
    "marks": dict,
}


class LockPolicy:
    """How a writer meets a store another process is writing: wait (telling ``on_wait`` what
    holds it) or fail at once. The CLI sets it from ``--no-wait``."""

    wait: bool = True
    on_wait: Callable[[str], None] | None = None


_HELD: dict[Path, list] = {}  # store root -> [open lock file, depth]: the lock is re-entrant
SUBDIRS = ("shards", "embeddings", "indexes", "scores", "reports")
SCRATCH = ".scratch"


@dataclass(frozen=True)
class EmbeddingFile:
    """One embedding file of the store, and which of its rows are current."""

    release: str
    modality: str
    path: Path
    current: np.ndarray  # bool per row: this row is the star's current one in this modality


class Store:
    """A specsearch store rooted at ``root``. Creating one makes the layout if it is missing."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root)
        if not (self.root / MANIFEST).exists():
            if not create:
                raise SpecsearchError(f"{self.root}: not a specsearch store (no {MANIFEST})")
            if any((self.root / "shards").glob("release=*")):
                raise SpecsearchError(
                    f"{self.root}: the manifest is missing but the store holds data; run "
                    f"'specsearch check --store {self.root} --repair' to rebuild it"
                )
            for sub in SUBDIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            with self.writing("create"):
                if not (self.root / MANIFEST).exists():
                    self.write_manifest({"format": STORE_FORMAT, "created": _now(), "releases": {}})

    @classmethod
    def open(cls, store: Store | str | os.PathLike) -> Store:
        """The Store of an existing store directory (or the Store itself)."""
        return store if isinstance(store, Store) else cls(store, create=False)

    # ------------------------------------------------------------------ manifest

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        """The manifest, checked for the shape every reader relies on."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise SpecsearchError(
                f"{self.root}: the manifest is missing; run "
                f"'specsearch check --store {self.root} --repair' to rebuild it"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = getattr(err, "msg", None) or type(err).__name__
            raise SpecsearchError(self._corrupt(f"not JSON: {reason}")) from None
        if not isinstance(manifest, dict):
            raise SpecsearchError(self._corrupt(f"a {type(manifest).__name__}, not an object"))
        if manifest.get("format") != STORE_FORMAT:
            raise SpecsearchError(self._corrupt(f"store format {manifest.get('format')!r}"))
        for section, kind in MANIFEST_SECTIONS.items():
            if section in manifest and not isinstance(manifest[section], kind):
                raise SpecsearchError(self._corrupt(f"'{section}' is not an object"))
        if "releases" not in manifest:
            raise SpecsearchError(self._corrupt("no 'releases'"))
        for release, entry in manifest["releases"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
                raise SpecsearchError(self._corrupt(f"release {release!r} lists no files"))
        return manifest

    def _corrupt(self, why: str) -> str:
        return (
            f"{self.manifest_path}: corrupt manifest ({why}); run "
            f"'specsearch check --store {self.root} --repair' to rebuild it from the files"
        )

    @contextlib.contextmanager
    def writing(self, what: str = "write") -> Iterator[Store]:
        """Hold the store's writer lock for a stage (re-entrant within a process)."""
        import fcntl

        key = self.root.resolve()
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
            try:
                yield self
            finally:
                held[1] -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / LOCK, "a+")  # noqa: SIM115 - held for the whole stage
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                if not LockPolicy.wait:
                    raise SpecsearchError(
                        f"{self.root}: the store is being written by {holder}; try again later "
                        "(or without --no-wait to wait for it)"
                    ) from None
                if LockPolicy.on_wait is not None:
                    LockPolicy.on_wait(f"waiting for {holder} to finish writing {self.root}")
                fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            handle.truncate()
            handle.write(f"{what} (pid {os.getpid()}, since {_now()})\n")
            handle.flush()
            _HELD[key] = [handle, 1]
            self._clean_leftovers()
            try:
                yield self
            finally:
                del _HELD[key]
                handle.seek(0)
                handle.truncate()  # nobody holds it now: an untouched store stays byte-identical
        finally:
            handle.close()  # closing releases the lock

    def _clean_leftovers(self) -> None:
        """What a killed writer left: scratch folders and temporary files (no writer runs now)."""
        shutil.rmtree(self.root / SCRATCH, ignore_errors=True)
        for pattern in ("shards/release=*/.staging-*", "**/.*.tmp"):
            for leftover in self.root.glob(pattern):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = _now()
        write_json_atomic(manifest, self.manifest_path)

    def _update_manifest(self, section: str, key: str, value: Any) -> None:
        with self.writing(f"update {section}"):
            manifest = self.read_manifest()
            manifest.setdefault(section, {})[key] = value
            self.write_manifest(manifest)

    # ------------------------------------------------------------------ releases

    def shard_dir(self, release: str) -> Path:
        return self.root / "shards" / f"release={check_release(release)}"

    def releases(self) -> list[str]:
        """Releases with ingested shards, in the order they were first ingested (oldest first)."""
        # JSON objects keep their insertion order
        recorded = list(self.read_manifest().get("releases", {}))
        return [r for r in recorded if self.shard_dir(r).exists()]

    def _release_rank(self) -> dict[str, int]:
        return {release: rank for rank, release in enumerate(self.releases())}

    def _check_known(self, release: str) -> str:
        if release not in self.read_manifest().get("releases", {}):
            raise SpecsearchError(f"{self.root}: release {release} is not in the store")
        return release

    @contextlib.contextmanager
    def scratch(self, stage: str, release: str) -> Iterator[Path]:
        """A fresh work folder for one run of ``stage`` on ``release``, removed afterwards.

        A folder left by a killed run of the same stage and release (exactly: never a release
        whose name only starts the same) is removed first.
        """
        base = self.root / SCRATCH
        base.mkdir(parents=True, exist_ok=True)
        # '+' cannot occur in a release name, so the prefix matches this release alone
        prefix = f"{stage}+{check_release(release)}+"
        for stale in base.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ shards

    def write_release(
        self,
        release: str,
        tables: Iterable[pa.Table],
        rejects: pa.Table | Callable[[], pa.Table] | None = None,
        sources: list[str] | None = None,
        rows_per_file: int = ROWS_PER_FILE,
        source_fingerprint: str | None = None,
    ) -> dict[str, Any]:
        """Write one release's canonical shards (replacing any earlier write of that release).

        ``tables`` follow SHARD_SCHEMA, in order, and may be a generator: they are streamed into
        part files of ``rows_per_file`` rows (row groups of 4096, or each table's own size when
        smaller), so memory holds one table at a time. ``rejects`` may be a function, called once
        ``tables`` is exhausted (a streaming writer learns of rejects as it goes).
        ``source_fingerprint`` identifies the input files (``nightly`` skips a release ingested
        from the same files). Returns the manifest entry for the release.
        """
        with self.writing("write release"):
            return self._write_release(
                release, tables, rejects, sources, rows_per_file, source_fingerprint
            )

    def _write_release(
        self, release, tables, rejects, sources, rows_per_file, source_fingerprint
    ) -> dict[str, Any]:
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
            "files": {p.name: file_record(p) for p in files},
            "sources": sources or [],
            "source_fingerprint": source_fingerprint,
            "ingested": _now(),
        }
        self._update_manifest("releases", release, entry)
        return entry

    def shard_checksums(self, release: str) -> dict[Path, str]:
        """{shard file: sha256} of one release, as the manifest lists them."""
        entry = self.read_manifest().get("releases", {}).get(self._check_known(release))
        return {
            self.shard_dir(release) / name: _sha(record)
            for name, record in sorted(entry["files"].items())
        }

    def verify(self, path: Path, record: dict | str, rebuild: str) -> Path:
        """``path`` if it is still the file the manifest recorded (size and modification time:
        a cheap check every reader makes), else a one-line error naming it and ``rebuild``."""
        if not isinstance(record, dict):  # an older manifest: the SHA-256 alone
            if not path.exists():
                raise SpecsearchError(f"{path}: missing; {rebuild}")
            return path
        try:
            info = path.stat()
        except FileNotFoundError:
            raise SpecsearchError(f"{path}: missing; {rebuild}") from None
        if info.st_size != record.get("size") or info.st_mtime_ns != record.get("mtime_ns"):
            raise SpecsearchError(
                f"{path}: changed since it was written (size or time differ from the manifest); "
                f"{rebuild}"
            )
        return path

    def shard_files(self, release: str | None = None) -> list[Path]:
        """The shard files the manifest lists (all releases, or one): never a stray or stale file."""
        releases = [release] if release else self.releases()
        if not releases:
            raise SpecsearchError(f"{self.root}: the store has no ingested release")
        entries = self.read_manifest().get("releases", {})
        paths = []
        for rel in releases:
            records = entries.get(self._check_known(rel), {}).get("files", {})
            if not records:
                raise SpecsearchError(f"{self.root}: release {rel} has no shards (re-run ingest)")
            for name, record in sorted(records.items()):
                rebuild = f"re-run 'specsearch ingest ... --release {rel} --replace'"
                paths.append(self.verify(self.shard_dir(rel) / name, record, rebuild))
        return paths

    def shards(self, release: str | None = None) -> ds.Dataset:
        """Every canonical row of one release, or of all (history: a star may appear in several
        releases), as an Arrow dataset. ``read_shards`` applies the current-row rule."""
        paths = [str(p) for p in self.shard_files(release)]
        return ds.dataset(paths, format=verified_format(), schema=pq.read_schema(paths[0]))

    def read_shards(
        self,
        columns: list[str] | None = None,
        source_ids: np.ndarray | None = None,
        release: str | None = None,
        history: bool = False,
    ) -> pa.Table:
        """Canonical rows as one table: the current row of every star (default), the rows of one
        ``release``, or with ``history`` every row of every release. ``source_ids`` restricts
        the stars read."""
        names = None if columns is None else list(dict.fromkeys([*columns, "source_id"]))
        if names is not None and not (release or history):
            names = list(dict.fromkeys([*names, "release"]))
        where = None
        if source_ids is not None:
            where = pc.field("source_id").isin(pa.array(np.asarray(source_ids, dtype=np.int64)))
        table = self.shards(release).to_table(columns=names, filter=where)
        if not (release or history):
            table = table.filter(pa.array(_latest(table, self._release_rank())))
        return table.select(columns) if columns is not None else table

    def iter_shard_batches(
        self,
        release: str | None = None,
        columns: list[str] | None = None,
        batch_size: int = 1024,
        history: bool = False,
    ) -> Iterator[pa.RecordBatch]:
        """Stream canonical rows in record batches of at most ``batch_size`` rows: the current
        rows (default), one ``release``'s rows, or with ``history`` every row."""
        if release or history:
            yield from self.shards(release).to_batches(columns=columns, batch_size=batch_size)
            return
        releases = self.releases()
        for position, rel in enumerate(releases):
            later = [self._shard_ids(r) for r in releases[position + 1 :]]
            superseded = np.unique(np.concatenate(later)) if later else np.zeros(0, np.int64)
            names = None if columns is None else list(dict.fromkeys([*columns, "source_id"]))
            for batch in self.shards(rel).to_batches(columns=names, batch_size=batch_size):
                if superseded.size:
                    ids = batch.column("source_id").to_numpy()
                    batch = batch.filter(pa.array(~np.isin(ids, superseded)))
                if columns is not None:
                    batch = batch.select(columns)
                if batch.num_rows:
                    yield batch

    def _shard_ids(self, release: str) -> np.ndarray:
        return self.shards(release).to_table(columns=["source_id"]).column("source_id").to_numpy()

    def rejects(self, release: str | None = None) -> pa.Table:
        releases = [release] if release else self.releases()
        tables = [
            pq.read_table(self.shard_dir(r) / "rejects.parquet", **VERIFY)
            for r in releases
            if (self.shard_dir(r) / "rejects.parquet").exists()
        ]
        return pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()

    # ------------------------------------------------------------------ embeddings

    def embedding_path(self, release: str, modality: str, name: str) -> Path:
        """Where the embed stage writes one embedding file."""
        check_modality(modality)
        return (
            self.root
            / "embeddings"
            / f"release={check_release(release)}"
            / f"modality={modality}"
            / name
        )

    def record_embeddings(self, model_id: str) -> dict[str, Any]:
        """Commit the embedding files on disk to the manifest (with their rows); the embed stage
        calls this last. Returns the manifest entry."""
        releases: dict[str, Any] = {}
        for release in self.releases():
            for modality in MODALITIES:
                folder = self.embedding_path(release, modality, "x").parent
                files = sorted(folder.glob("part-*.parquet")) if folder.exists() else []
                if files:
                    releases.setdefault(release, {})[modality] = {
                        p.name: {"rows": pq.ParquetFile(p).metadata.num_rows, **file_record(p)}
                        for p in files
                    }
        entry = {"model_id": model_id, "releases": releases}
        with self.writing("record embeddings"):
            manifest = self.read_manifest()
            manifest["embeddings"] = entry
            self.write_manifest(manifest)
        return entry

    def embeddings_model(self) -> str | None:
        """The model id the store's embeddings were made with (None before the first embed)."""
        return self.read_manifest().get("embeddings", {}).get("model_id")

    def embedding_files(self, modality: str, release: str | None = None) -> list[Path]:
        """The embedding files of one modality the manifest lists, oldest release first."""
        return [path for _, path in self._embedding_files(modality, release)]

    def _embedding_files(self, modality: str, release: str | None) -> list[tuple[str, Path]]:
        check_modality(modality)
        recorded = self.read_manifest().get("embeddings", {}).get("releases", {})
        releases = [self._check_known(release)] if release else self.releases()
        rebuild = f"run 'specsearch check --store {self.root} --repair' (it re-embeds)"
        return [
            (rel, self.verify(self.embedding_path(rel, modality, name), record, rebuild))
            for rel in releases
            for name, record in sorted(recorded.get(rel, {}).get(modality, {}).items())
        ]

    def embedding_modalities(self) -> list[str]:
        """The modalities with at least one embedding file."""
        return [m for m in MODALITIES if self._embedding_files(m, None)]

    def current_embedding_files(self, modality: str) -> list[EmbeddingFile]:
        """Every embedding file of ``modality``, oldest release first, with the rows that are
        current (a star's row from the latest release that embedded it). Reads only source_id."""
        files = self._embedding_files(modality, None)
        if not files:
            raise SpecsearchError(f"{self.root}: no {modality} embeddings (run 'specsearch embed')")
        ids = [_read_ids(path) for _, path in files]
        rank = self._release_rank()
        ranks = np.concatenate(
            [np.full(len(i), rank[rel]) for (rel, _), i in zip(files, ids, strict=True)]
        )
        table = pa.table({"source_id": np.concatenate(ids), "_rank": ranks})
        current = _latest(table, None)
        bounds = np.cumsum([0] + [len(i) for i in ids])
        return [
            EmbeddingFile(rel, modality, path, current[bounds[j] : bounds[j + 1]])
            for j, (rel, path) in enumerate(files)
        ]

    def embeddings(
        self,
        modality: str,
        release: str | None = None,
        columns: list[str] | None = None,
        source_ids: np.ndarray | None = None,
        history: bool = False,
    ) -> pa.Table:
        """Embedding rows of one modality with a ``release`` column: the current row of every
        star (default), the rows of one ``release``, or with ``history`` every row.
        ``source_ids`` restricts the stars read (an id lookup reads few row groups)."""
        files = self._embedding_files(modality, release)
        if not files:
            where = f" of release {release}" if release else ""
            raise SpecsearchError(
                f"{self.root}: no {modality} embeddings{where} (run 'specsearch embed')"
            )
        names = None if columns is None else list(dict.fromkeys(["source_id", *columns]))
        where = None
        if source_ids is not None:
            where = pc.field("source_id").isin(pa.array(np.asarray(source_ids, dtype=np.int64)))
        parts = []
        for rel, path in files:
            part = ds.dataset(str(path), format=verified_format()).to_table(
                columns=names, filter=where
            )
            parts.append(
                part.append_column("release", pa.array([rel] * part.num_rows, pa.string()))
            )
        table = pa.concat_tables(parts)
        if not (release or history):
            table = table.filter(pa.array(_latest(table, self._release_rank())))
        keep = [*columns, "release"] if columns is not None else table.column_names
        return table.select(list(dict.fromkeys(keep)))

    # ------------------------------------------------------------------ scores

    def score_path(self, release: str, name: str) -> Path:
        """Where the score stage writes one file of a release (scores, neighbours)."""
        return self.root / "scores" / f"release={check_release(release)}" / name

    def reference_dir(self) -> Path:
        """Where the score stage freezes its calibration (floors, tail models, kNN indexes)."""
        return self.root / "scores" / "reference"

    def record_scores(self, release: str, entry: dict[str, Any]) -> None:
        """Commit a release's score files (``entry["files"]``: {kind: file name}) and run facts."""
        self._check_known(release)
        entry = dict(entry)
        entry["records"] = {
            kind: file_record(self.score_path(release, name))
            for kind, name in entry.get("files", {}).items()
        }
        self._update_manifest("scores", release, entry)

    def read_scores(self, release: str, kind: str = "scores", columns: list[str] | None = None):
        """A release's committed score rows (``kind`` "scores") or kNN graph ("neighbors"),
        checked against the manifest; None where the release has none."""
        entry = self.score_entry(release)
        if not entry or kind not in entry.get("files", {}):
            return None
        path = self.score_path(release, entry["files"][kind])
        record = entry.get("records", {}).get(kind, {"sha256": ""})
        rebuild = f"run 'specsearch score --store {self.root} --release {release}' again"
        self.verify(path, record if "size" in record else "", rebuild)
        return pq.read_table(path, columns=columns, **VERIFY)

    def scored_releases(self) -> list[str]:
        """Releases with committed scores, oldest first."""
        recorded = self.read_manifest().get("scores", {})
        return [r for r in self.releases() if r in recorded]

    def score_entry(self, release: str) -> dict[str, Any] | None:
        """The manifest entry of a release's scores (None: not scored)."""
        return self.read_manifest().get("scores", {}).get(release)

    def _score_files(self, kind: str) -> list[Path]:
        recorded = self.read_manifest().get("scores", {})
        out = []
        for release in self.scored_releases():
            entry = recorded[release]
            if kind not in entry.get("files", {}):
                continue
            record = entry.get("records", {}).get(kind, "")
            rebuild = f"run 'specsearch score --store {self.root} --release {release}' again"
            out.append(self.verify(self.score_path(release, entry["files"][kind]), record, rebuild))
        return out

    def score_files(self) -> list[Path]:
        """Committed score files, oldest release first."""
        return self._score_files("scores")

    def neighbor_files(self) -> list[Path]:
        """Committed kNN-graph files, oldest release first."""
        return self._score_files("neighbors")

    # ------------------------------------------------------------------ reports

    def report_dir(self, release: str) -> Path:
        """Where ``nightly`` writes a release's report."""
        return self.root / "reports" / f"release={check_release(release)}"

    def record_report(self, release: str, entry: dict[str, Any]) -> None:
        """Commit a release's report (its files and the inputs it was made from)."""
        self._check_known(release)
        self._update_manifest("reports", release, entry)

    def report_entry(self, release: str) -> dict[str, Any] | None:
        return self.read_manifest().get("reports", {}).get(release)

    def release_entry(self, release: str) -> dict[str, Any] | None:
        """The manifest entry of an ingested release (None: not in the store)."""
        return self.read_manifest().get("releases", {}).get(release)

    # ------------------------------------------------------------------ marks

    def marks_path(self) -> Path:
        return self.root / "marks" / "marks.parquet"

    def read_marks(self) -> pa.Table:
        """Every mark ever made (MARKS_SCHEMA), oldest first; empty before the first."""
        path = self.marks_path()
        if not path.exists():
            return MARKS_SCHEMA.empty_table()
        return pq.read_table(path, **VERIFY).cast(MARKS_SCHEMA)

    def add_marks(self, marks: pa.Table) -> int:
        """Append marks (MARKS_SCHEMA rows) to the marks table; returns how many it holds."""
        with self.writing("mark"):
            return self._add_marks(marks)

    def _add_marks(self, marks: pa.Table) -> int:
        table = pa.concat_tables(
            [self.read_marks(), marks.select(MARKS_SCHEMA.names).cast(MARKS_SCHEMA)]
        )
        write_parquet_atomic(table, self.marks_path())
        self._update_manifest(
            "marks",
            "marks.parquet",
            {"rows": table.num_rows, "sha256": file_sha256(self.marks_path())},
        )
        return table.num_rows

    # ------------------------------------------------------------------ indexes

    def index_dir(self) -> Path:
        return self.root / "indexes"

    def record_index(self, params: dict) -> None:
        """Commit a saved index's parameters to the manifest."""
        keys = (
            "version",
            "factory",
            "n",
            "d",
            "recall",
            "k",
            "search_params",
            "model_id",
            "releases",
            "saved",
        )
        self._update_manifest("indexes", params["modality"], {key: params.get(key) for key in keys})


def writes_store(what: str):
    """Decorate a stage whose first argument is a store (path or Store): it runs with the store
    opened and its writer lock held (``Store.writing``)."""
    import functools

    def decorate(stage):
        @functools.wraps(stage)
        def run(store, *args, **kwargs):
            opened = Store.open(store)
            with opened.writing(what):
                return stage(opened, *args, **kwargs)

        return run

    return decorate


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest keeps of a file: its SHA-256, size and modification time."""
    info = path.stat()
    return {"sha256": file_sha256(path), "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _sha(record: dict | str) -> str:
    return record if isinstance(record, str) else record["sha256"]


def _read_ids(path: Path) -> np.ndarray:
    return pq.read_table(path, columns=["source_id"], **VERIFY).column("source_id").to_numpy()


def _latest(table: pa.Table, rank: dict[str, int] | None) -> np.ndarray:
    """Bool mask of the rows that are their star's latest: the highest release rank per
    source_id. ``rank`` maps the table's ``release`` column to ranks (None: the table has a
    ``_rank`` column)."""
    ids = table.column("source_id").to_numpy()
    if rank is None:
        ranks = table.column("_rank").to_numpy()
    else:  # rank follows the order of the dict's keys
        found = pc.index_in(table.column("release"), value_set=pa.array(list(rank), pa.string()))
        ranks = found.fill_null(-1).to_numpy()
    order = np.lexsort((ranks, ids))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = ids[order][1:] != ids[order][:-1]
    keep = np.zeros(len(ids), dtype=bool)
    keep[order[last]] = True
    return keep


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
