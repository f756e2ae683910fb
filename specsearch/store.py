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
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import EnvironmentFault, InputError, SpecsearchError
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

if TYPE_CHECKING:
    import pyarrow.dataset as ds

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


_VERIFIED: set[tuple] = set()  # (path, mtime, size) of files whose SHA-256 matched the manifest
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
            holds_data = any((self.root / "shards").glob("release=*"))
            if not create and not holds_data:
                raise SpecsearchError(f"{self.root}: not a specsearch store (no {MANIFEST})")
            if holds_data:
                raise EnvironmentFault(
                    f"{self.root}: the manifest is missing but the store holds data; run "
                    f"'specsearch check --store {self.root} --repair' to rebuild it"
                )
            for sub in SUBDIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            with self.writing("create"):
                if not (self.root / MANIFEST).exists():
                    self.write_manifest({"format": STORE_FORMAT, "created": _now(), "releases": {}})

    @classmethod
    def at(cls, root: str | os.PathLike) -> Store:
        """The store at ``root`` as it is, without reading its manifest (``check`` opens a
        store whose manifest is missing or damaged this way)."""
        store = cls.__new__(cls)
        store.root = Path(root)
        return store

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
            raise EnvironmentFault(
                f"{self.root}: the manifest is missing; run "
                f"'specsearch check --store {self.root} --repair' to rebuild it"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = getattr(err, "msg", None) or type(err).__name__
            raise EnvironmentFault(self._corrupt(f"not JSON: {reason}")) from None
        if not isinstance(manifest, dict):
            raise EnvironmentFault(self._corrupt(f"a {type(manifest).__name__}, not an object"))
        if manifest.get("format") != STORE_FORMAT:
            raise EnvironmentFault(self._corrupt(f"store format {manifest.get('format')!r}"))
        for section, kind in MANIFEST_SECTIONS.items():
            if section in manifest and not isinstance(manifest[section], kind):
                raise EnvironmentFault(self._corrupt(f"'{section}' is not an object"))
        if "releases" not in manifest:
            raise EnvironmentFault(self._corrupt("no 'releases'"))
        for release, entry in manifest["releases"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
                raise EnvironmentFault(self._corrupt(f"release {release!r} lists no files"))
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
                    raise EnvironmentFault(
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
            if self.manifest_path.exists():  # what a killed writer began
                with contextlib.suppress(SpecsearchError):  # a damaged manifest: 'check'
                    self._finish_pending()
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
        """Write the manifest (the commit point); one that records nothing new is not written,
        so a run that changes nothing leaves the store byte-identical."""
        with contextlib.suppress(OSError, ValueError):
            current = json.loads(self.manifest_path.read_text())
            if isinstance(current, dict) and _sans_time(current) == _sans_time(manifest):
                return
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
        replace: bool = False,
    ) -> dict[str, Any]:
        """Write one release's canonical shards. A release already in the store needs
        ``replace``: everything derived from it goes in the same commit (``_drop_derived``).

        ``tables`` follow SHARD_SCHEMA, in order, and may be a generator: they are streamed into
        part files of ``rows_per_file`` rows (row groups of 4096, or each table's own size when
        smaller), so memory holds one table at a time. ``rejects`` may be a function, called once
        ``tables`` is exhausted (a streaming writer learns of rejects as it goes).
        ``source_fingerprint`` identifies the input files (``nightly`` skips a release ingested
        from the same files). Returns the manifest entry for the release.
        """
        with self.writing("write release"):
            self.check_new_release(release, replace)
            return self._write_release(
                release, tables, rejects, sources, rows_per_file, source_fingerprint
            )

    def check_new_release(self, release: str, replace: bool) -> None:
        """A one-line error when ``release`` is in the store and ``replace`` is not given."""
        if not replace and release in self.read_manifest().get("releases", {}):
            raise InputError(
                f"{self.root}: release {release} is already in the store; pass --replace to "
                "replace it (its embeddings, scores and report go with it)"
            )

    def _write_release(
        self, release, tables, rejects, sources, rows_per_file, source_fingerprint
    ) -> dict[str, Any]:
        out_dir = self.shard_dir(release)
        out_dir.mkdir(parents=True, exist_ok=True)
        # the new files go to a staging folder first, so a write that fails or is killed before
        # they are all written leaves the release as it was (the next writer removes the
        # folder). Then the intent is recorded in the manifest, the files are renamed into
        # place and the manifest commits them: a run killed among the renames is finished by
        # the next writer from the intent and the staging folder (``_finish_pending``).
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
        writer = PartWriter(staging, rows_per_file)
        intent = False
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
            # renames keep sizes and times: the records of the staged files hold in place
            entry = {
                "rows": sum(pq.ParquetFile(p).metadata.num_rows for p in staged),
                "rejects": rejects.num_rows,
                "files": {p.name: file_record(p) for p in staged},
                "rejects_file": file_record(staging / "rejects.parquet"),
                "sources": sources or [],
                "source_fingerprint": source_fingerprint,
                "ingested": _now(),
            }
            manifest = self.read_manifest()
            manifest.setdefault("pending", {})[release] = {**entry, "staging": staging.name}
            self.write_manifest(manifest)
            intent = True
            for path in [*staged, staging / "rejects.parquet"]:
                os.replace(path, out_dir / path.name)
        except BaseException:
            writer.abort()
            if not intent:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        self._finish_pending()
        return entry

    def _finish_pending(self) -> list[str]:
        """Finish the writes whose intent the manifest records (this one, or one killed among
        its renames): move the files still in the staging folder into place and commit the
        release, with everything derived from its earlier data dropped. An intent whose files
        are neither in place nor staged (damaged since) is forgotten, and the release stays
        as the manifest had it. Returns the releases committed."""
        manifest = self.read_manifest()
        pending = manifest.get("pending", {})
        if not pending:
            return []
        doomed, done = [], []
        for release, intent in pending.items():
            out_dir = self.shard_dir(release)
            staging = out_dir / intent.get("staging", ".staging-none")
            entry = {k: v for k, v in intent.items() if k != "staging"}
            records = {**entry["files"], "rejects.parquet": entry["rejects_file"]}
            for name, record in records.items():
                if not _same(out_dir / name, record) and _same(staging / name, record):
                    os.replace(staging / name, out_dir / name)
            doomed.append(staging)
            if all(_same(out_dir / name, record) for name, record in records.items()):
                if release in manifest["releases"]:
                    doomed += self._drop_derived(manifest, release)
                manifest["releases"][release] = entry
                doomed += [p for p in out_dir.glob("part-*.parquet") if p.name not in records]
                done.append(release)
            elif release not in manifest["releases"]:
                doomed.append(out_dir)  # a new release that cannot be finished
        manifest.pop("pending")
        self.write_manifest(manifest)  # the commit point
        remove_paths(doomed)
        return done

    def _drop_derived(self, manifest: dict[str, Any], release: str) -> list[Path]:
        """Take out of ``manifest`` everything derived from ``release``'s data (its embeddings,
        scores and report; with the calibration, when it was calibrated on this release, every
        score). Returns the paths to delete once the manifest is written. Indexes are not
        touched: they record what they cover, and an index that covered this release is stale
        (``index_staleness``)."""
        doomed: list[Path] = []
        embedded = manifest.get("embeddings", {}).get("releases", {})
        if embedded.pop(release, None) is not None:
            doomed.append(self.root / "embeddings" / f"release={release}")
        manifest.get("embeddings", {}).get("missing", {}).pop(release, None)
        scores = manifest.get("scores", {})
        calibration = manifest.get("calibration")
        if calibration and calibration.get("release") == release:
            manifest.pop("calibration")
            doomed.append(self.reference_dir())
            dropped = list(scores)
        else:
            dropped = [release] if release in scores else []
        for name in dropped:
            scores.pop(name)
            doomed.append(self.score_path(name, "x").parent)
        if manifest.get("reports", {}).pop(release, None) is not None:
            doomed.append(self.report_dir(release))
        return doomed

    def remove_release(self, release: str) -> list[Path]:
        """Remove ``release`` and everything derived from it in one commit (``specsearch release
        rm``). Returns what was deleted."""
        with self.writing(f"remove {release}"):
            manifest = self.read_manifest()
            if release not in manifest.get("releases", {}):
                raise InputError(f"{self.root}: release {release} is not in the store")
            manifest["releases"].pop(release)
            doomed = [self.shard_dir(release), *self._drop_derived(manifest, release)]
            self.write_manifest(manifest)
            remove_paths(doomed)
            return doomed

    def shard_checksums(self, release: str) -> dict[Path, str]:
        """{shard file: sha256} of one release, as the manifest lists them (each file checked
        to be the one recorded)."""
        entry = self.read_manifest().get("releases", {}).get(self._check_known(release))
        rebuild = f"re-run 'specsearch ingest ... --release {release} --replace'"
        return {
            self.verify(self.shard_dir(release) / name, record, rebuild): _sha(record)
            for name, record in sorted(entry["files"].items())
        }

    def verify(self, path: Path, record: dict | str, rebuild: str) -> Path:
        """``path`` if it is still the file the manifest recorded (size and modification time:
        a cheap check every reader makes), else a one-line error naming it and ``rebuild``."""
        if not isinstance(record, dict):  # an older manifest: the SHA-256 alone
            if not path.exists():
                raise EnvironmentFault(f"{path}: missing; {rebuild}")
            return path
        try:
            info = path.stat()
        except FileNotFoundError:
            raise EnvironmentFault(f"{path}: missing; {rebuild}") from None
        if info.st_size != record.get("size"):
            raise EnvironmentFault(
                f"{path}: changed since it was written ({info.st_size} bytes, the manifest "
                f"recorded {record.get('size')}); {rebuild}"
            )
        if info.st_mtime_ns != record.get("mtime_ns"):
            # touched or copied (cp -r, rsync): trust it only if its content is the same
            key = (path, info.st_mtime_ns, info.st_size)
            if key not in _VERIFIED:
                if file_sha256(path) != record.get("sha256"):
                    raise EnvironmentFault(
                        f"{path}: changed since it was written (its SHA-256 differs from the "
                        f"manifest's); {rebuild}"
                    )
                _VERIFIED.add(key)
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
        import pyarrow.dataset as ds  # here, not above: it imports pandas, which a lookup by id
        # (``rows_with_ids``) does without

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
        if source_ids is not None:
            parts = [rows_with_ids(path, names, source_ids) for path in self.shard_files(release)]
            table = pa.concat_tables(parts, promote_options="default")
        else:
            table = self.shards(release).to_table(columns=names)
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

    def record_embeddings(
        self,
        model_id: str,
        done: dict[str, dict[str, list[str]]] | None = None,
        missing: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """Commit the embed stage's files to the manifest; it calls this last.

        ``done``: {release: {modality: file names}} of the chunks embedded from the current
        shards; ``missing``: {release: chunks not yet embedded}. Any other embedding file (of a
        shard since replaced, a release since removed, a chunk killed part-way) is deleted.
        Without ``done`` (tools that write embedding files themselves) every file on disk of an
        ingested release is recorded. Returns the manifest entry.
        """
        with self.writing("record embeddings"):
            if done is None:
                done = {
                    release: {
                        m: [p.name for p in self.embedding_path(release, m, "x").parent.glob("*")]
                        for m in MODALITIES
                    }
                    for release in self.releases()
                }
            missing = {r: n for r, n in (missing or {}).items() if n}
            releases: dict[str, Any] = {}
            for release, modalities in done.items():
                for modality, names in modalities.items():
                    folder = self.embedding_path(release, modality, "x").parent
                    found = {}
                    for name in sorted(names):
                        path = folder / name
                        if path.exists():
                            rows = pq.ParquetFile(path).metadata.num_rows
                            found[name] = {"rows": rows, **file_record(path)}
                        else:
                            missing[release] = missing.get(release, 0) + 1
                    if found:
                        releases.setdefault(release, {})[modality] = found
            entry = {"model_id": model_id, "releases": releases, "missing": missing}
            manifest = self.read_manifest()
            manifest["embeddings"] = entry
            self.write_manifest(manifest)
            for path in (self.root / "embeddings").glob("release=*/modality=*/*"):
                release = path.parent.parent.name.removeprefix("release=")
                modality = path.parent.name.removeprefix("modality=")
                if path.name not in releases.get(release, {}).get(modality, {}):
                    path.unlink(missing_ok=True)  # stale: no current shard calls for it
        return entry

    def missing_embeddings(self) -> dict[str, int]:
        """{release: chunks not yet embedded (-1: none is)} for the releases whose embeddings
        are incomplete."""
        embeddings = self.read_manifest().get("embeddings", {})
        missing = {r: n for r, n in embeddings.get("missing", {}).items() if n}
        for release in self.releases():  # ingested (or replaced) after the last embed run
            if release not in embeddings.get("releases", {}):
                missing[release] = -1
        return missing

    def require_embeddings(self, action: str) -> None:
        """A one-line error when some release is not (fully) embedded: ``action`` would use
        a partial store."""
        missing = self.missing_embeddings()
        if missing:
            where = ", ".join(
                f"{r} (all)" if n < 0 else f"{r} ({n} chunks)" for r, n in missing.items()
            )
            raise SpecsearchError(
                f"{self.root}: embeddings are incomplete ({where} not embedded); run "
                f"'specsearch embed --store {self.root}' before {action}"
            )

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
        if source_ids is None:
            import pyarrow.dataset as ds
        parts = []
        for rel, path in files:
            if source_ids is not None:
                part = rows_with_ids(path, names, source_ids)
            else:
                part = ds.dataset(str(path), format=verified_format()).to_table(columns=names)
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

    def record_calibration(self, release: str, calibration_id: str) -> None:
        """Commit the calibration the score stage froze in ``reference_dir`` (every file in it)."""
        folder = self.reference_dir()
        files = {
            p.name: file_record(p)
            for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".")
        }
        with self.writing("record calibration"):
            manifest = self.read_manifest()
            manifest["calibration"] = {
                "release": release,
                "calibration_id": calibration_id,
                "files": files,
            }
            self.write_manifest(manifest)

    def drop_scores(self) -> None:
        """Forget the calibration and every release's scores in one commit (the next score run
        calibrates afresh)."""
        with self.writing("drop scores"):
            manifest = self.read_manifest()
            manifest.pop("calibration", None)
            doomed = [self.reference_dir()]
            for release in manifest.pop("scores", {}):
                doomed.append(self.score_path(release, "x").parent)
            self.write_manifest(manifest)
            remove_paths(doomed)

    def calibration(self) -> dict[str, Any] | None:
        """The committed calibration's manifest entry, its files checked (None: not calibrated;
        files left by a run killed before it committed are not a calibration)."""
        entry = self.read_manifest().get("calibration")
        if entry is None:
            return None
        rebuild = f"run 'specsearch check --store {self.root} --repair' (it recalibrates)"
        for name, record in entry["files"].items():
            self.verify(self.reference_dir() / name, record, rebuild)
        return entry

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

    # ------------------------------------------------------------------ integrity

    def rebuild_manifest(self) -> dict[str, Any]:
        """A new manifest made from the files, when the manifest is lost or damaged: each
        release from its shard folder (releases ordered as their files were written) and the
        marks table. Embeddings, calibration, scores, indexes and reports are left for the
        stages to record again (``check --repair`` runs them). A damaged manifest is kept
        beside it as ``manifest.json.damaged``. Returns the new manifest."""
        with self.writing("rebuild manifest"):
            if self.manifest_path.exists():
                os.replace(self.manifest_path, self.root / (MANIFEST + ".damaged"))
            folders = []
            for folder in (self.root / "shards").glob("release=*"):
                parts = sorted(folder.glob("part-*.parquet"))
                if parts:
                    folders.append((min(p.stat().st_mtime_ns for p in parts), folder, parts))
            releases: dict[str, Any] = {}
            for written, folder, parts in sorted(folders, key=lambda f: f[0]):
                rejects = folder / "rejects.parquet"
                releases[folder.name.removeprefix("release=")] = {
                    "rows": sum(pq.ParquetFile(p).metadata.num_rows for p in parts),
                    "rejects": pq.ParquetFile(rejects).metadata.num_rows if rejects.exists() else 0,
                    "files": {p.name: file_record(p) for p in parts},
                    "rejects_file": file_record(rejects) if rejects.exists() else None,
                    "sources": [],
                    "source_fingerprint": None,
                    "ingested": _dt.datetime.fromtimestamp(
                        written / 1e9, _dt.timezone.utc
                    ).isoformat(timespec="seconds"),
                    "rebuilt": True,
                }
            manifest: dict[str, Any] = {
                "format": STORE_FORMAT,
                "created": _now(),
                "rebuilt": _now(),
                "releases": releases,
            }
            if self.marks_path().exists():
                rows = pq.ParquetFile(self.marks_path()).metadata.num_rows
                manifest["marks"] = {
                    "marks.parquet": {"rows": rows, "sha256": file_sha256(self.marks_path())}
                }
            self.write_manifest(manifest)
            return manifest

    def forget(self, section: str, key: str) -> None:
        """Drop one entry of a derived section (``scores``, ``reports``, ``indexes``) and its
        files, in one commit (``check --repair``, before it makes them again)."""
        with self.writing(f"forget {section} {key}"):
            manifest = self.read_manifest()
            if manifest.get(section, {}).pop(key, None) is None:
                return
            self.write_manifest(manifest)
            if section == "scores":
                remove_paths([self.score_path(key, "x").parent])

    def audit(self, on_file: Callable[[int], None] | None = None) -> tuple[list[Problem], int]:
        """Compare every file the manifest lists with its SHA-256 and size, and find the files
        no entry lists, stale indexes and unfinished embeddings. Returns (problems, files
        checked); ``on_file(bytes)`` is called after each file (progress). Raises
        EnvironmentFault when the manifest itself is missing or corrupt."""
        manifest = self.read_manifest()
        problems: list[Problem] = []
        listed: set[Path] = {self.manifest_path}
        checked = 0

        def check(path: Path, record: dict | str | None, part: str, **where) -> None:
            nonlocal checked
            listed.add(path)
            if record is None:
                return
            if not path.exists():
                problems.append(Problem("missing", part, path, "listed in the manifest", **where))
                return
            size = path.stat().st_size
            if isinstance(record, dict) and size != record.get("size"):
                detail = f"{size} bytes, the manifest recorded {record.get('size')}"
                problems.append(Problem("damaged", part, path, detail, **where))
            elif file_sha256(path) != _sha(record):
                problems.append(
                    Problem("damaged", part, path, "SHA-256 differs from the manifest", **where)
                )
            checked += 1
            if on_file is not None:
                on_file(size)

        for release, entry in manifest["releases"].items():
            folder = self.shard_dir(release)
            for name, record in entry["files"].items():
                check(folder / name, record, "shards", release=release)
            check(folder / "rejects.parquet", entry.get("rejects_file"), "rejects", release=release)
        embeddings = manifest.get("embeddings", {})
        for release, modalities in embeddings.get("releases", {}).items():
            for modality, files in modalities.items():
                for name, record in files.items():
                    path = self.embedding_path(release, modality, name)
                    check(path, record, "embeddings", release=release, modality=modality)
        if manifest.get("embeddings"):
            for release, n in self.missing_embeddings().items():
                detail = "not embedded" if n < 0 else f"{n} chunks not embedded"
                path = self.root / "embeddings" / f"release={release}"
                problems.append(Problem("incomplete", "embeddings", path, detail, release=release))
        calibration = manifest.get("calibration")
        if calibration:
            for name, record in calibration["files"].items():
                check(self.reference_dir() / name, record, "calibration")
        for release, entry in manifest.get("scores", {}).items():
            for kind, name in entry.get("files", {}).items():
                record = entry.get("records", {}).get(kind)
                check(self.score_path(release, name), record, "scores", release=release)
        for modality, entry in manifest.get("indexes", {}).items():
            for name, record in entry.get("files", {}).items():
                check(self.index_dir() / name, record, "index", modality=modality)
            if entry.get("covers") not in (None, self._embedding_digest(modality)):
                path = self.index_dir() / f"{modality}.faiss"
                detail = "built on other embeddings than the store's"
                problems.append(Problem("stale", "index", path, detail, modality=modality))
        for name, record in manifest.get("marks", {}).items():
            check(self.root / "marks" / name, record, "marks")
        for release, entry in manifest.get("reports", {}).items():
            for name in entry.get("files", []):
                path = self.report_dir(release) / name
                listed.add(path)
                if not path.exists():
                    detail = "listed in the manifest"
                    problems.append(Problem("missing", "report", path, detail, release=release))
        if manifest.get("pending"):
            for release in manifest["pending"]:
                detail = "a write was killed part-way (the next writer finishes or undoes it)"
                problems.append(
                    Problem(
                        "incomplete", "shards", self.shard_dir(release), detail, release=release
                    )
                )
        for sub in ("shards", "embeddings", "scores", "indexes", "marks"):
            for path in sorted((self.root / sub).rglob("*")):
                if path.is_dir() or path in listed:
                    continue
                problems.append(Problem("orphan", sub, path, "no manifest entry lists it"))
        return problems, checked

    # ------------------------------------------------------------------ indexes

    def index_dir(self) -> Path:
        return self.root / "indexes"

    def record_index(self, params: dict) -> None:
        """Commit a saved index: its parameters, its files (checksums, sizes) and the embedding
        files it covers (so that a search can tell when the index is stale)."""
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
        modality = params["modality"]
        names = [f"{modality}.faiss", f"{modality}.json", params.get("ivfdata")]
        entry = {key: params.get(key) for key in keys}
        entry["files"] = {
            name: file_record(self.index_dir() / name)
            for name in names
            if name and (self.index_dir() / name).exists()
        }
        entry["covers"] = self._embedding_digest(modality)
        self._update_manifest("indexes", modality, entry)

    def _embedding_digest(self, modality: str) -> str:
        """One SHA-256 over the committed embedding files of a modality (names and checksums)."""
        recorded = self.read_manifest().get("embeddings", {}).get("releases", {})
        listing = sorted(
            f"{release}/{name}:{_sha(record)}"
            for release, modalities in recorded.items()
            for name, record in modalities.get(modality, {}).items()
        )
        return hashlib.sha256("\n".join(listing).encode()).hexdigest()

    def check_index(self, modality: str) -> dict[str, Any]:
        """The manifest entry of a modality's index, after checking that its files are those
        recorded and that it covers the store's current embeddings: else a one-line error
        naming the fix."""
        entry = self.read_manifest().get("indexes", {}).get(modality)
        rebuild = f"run 'specsearch index build --store {self.root}'"
        if entry is None:
            raise SpecsearchError(f"{self.root}: no {modality} index; {rebuild}")
        for name, record in entry.get("files", {}).items():
            self.verify(self.index_dir() / name, record, rebuild)
        if entry.get("covers") not in (None, self._embedding_digest(modality)):
            raise EnvironmentFault(
                f"{self.index_dir() / (modality + '.faiss')}: stale: the {modality} embeddings "
                f"changed since the index was built; {rebuild}"
            )
        return entry


@dataclass(frozen=True)
class Problem:
    """One thing ``Store.audit`` found wrong: a file that is ``missing``, ``damaged`` (its SHA-256
    or size is not the manifest's) or an ``orphan`` (no manifest entry names it), embeddings that
    are ``incomplete``, an index that is ``stale``. ``part`` says what it belongs to (shards,
    rejects, embeddings, calibration, scores, index, marks, report); ``release`` and ``modality``
    where they apply."""

    kind: str
    part: str
    path: Path
    detail: str
    release: str | None = None
    modality: str | None = None

    @property
    def to_do(self) -> bool:
        """Work not yet done rather than damage: a release not (fully) embedded, an index built
        before the last embedding. The normal state between two stages of a pipeline."""
        return (self.kind, self.part) in (("incomplete", "embeddings"), ("stale", "index"))

    @property
    def derived(self) -> bool:
        """Whether ``check --repair`` can make it again from the shards."""
        return self.part not in ("shards", "rejects", "marks")

    def __str__(self) -> str:
        return f"{self.kind} {self.part}: {self.path} ({self.detail})"


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


def _same(path: Path, record: dict) -> bool:
    """Whether ``path`` is the file ``record`` describes (size and modification time)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return False
    return info.st_size == record.get("size") and info.st_mtime_ns == record.get("mtime_ns")


def remove_paths(paths: Iterable[Path]) -> None:
    """Delete files and folders (those already gone are fine)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _sha(record: dict | str) -> str:
    return record if isinstance(record, str) else record["sha256"]


def rows_with_ids(path: Path, columns: list[str] | None, source_ids: np.ndarray) -> pa.Table:
    """The rows of one Parquet file whose source_id is one of ``source_ids``, reading only the
    row groups whose source_id statistics (min, max) can hold one: an id lookup in a 1M store
    reads a few row groups. Pages are checked against their CRC as everywhere (VERIFY)."""
    wanted = np.unique(np.asarray(source_ids, dtype=np.int64))
    parquet = pq.ParquetFile(path, **VERIFY)
    meta = parquet.metadata
    leaf = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == "source_id")
    groups = [
        group
        for group in range(meta.num_row_groups)
        if _may_hold(meta.row_group(group).column(leaf).statistics, wanted)
    ]
    if not groups:
        empty = parquet.schema_arrow.empty_table()
        return empty if columns is None else empty.select(columns)
    # one row group at a time, its ids first: memory stays at one group's columns however many
    # groups the ids are spread over (ids in no particular order make every group a candidate)
    parts = []
    for group in groups:
        ids = parquet.read_row_group(group, columns=["source_id"]).column("source_id")
        hit = np.isin(ids.to_numpy(), wanted)
        if hit.any():
            parts.append(parquet.read_row_group(group, columns=columns).filter(pa.array(hit)))
    if not parts:
        empty = parquet.schema_arrow.empty_table()
        return empty if columns is None else empty.select(columns)
    return pa.concat_tables(parts)


def _may_hold(statistics, wanted: np.ndarray) -> bool:
    """Whether a row group with these source_id statistics may hold one of ``wanted`` (sorted)."""
    if statistics is None or not statistics.has_min_max:
        return True
    first = np.searchsorted(wanted, statistics.min)
    return bool(first < len(wanted) and wanted[first] <= statistics.max)


def _read_ids(path: Path) -> np.ndarray:
    return pq.read_table(path, columns=["source_id"], **VERIFY).column("source_id").to_numpy()


def _latest(table: pa.Table, rank: dict[str, int] | None) -> np.ndarray:
    """Bool mask of the rows that are their star's latest: the highest release rank per
    source_id. ``rank`` maps the table's ``release`` column to ranks (None: the table has a
    ``_rank`` column)."""
    import pyarrow.compute as pc

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


def _sans_time(manifest: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in manifest.items() if key != "updated"}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
