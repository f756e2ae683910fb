"""Ingest: raw survey files or shards -> one release of canonical shards in the store.

``ingest(source, store, release)`` is the library twin of ``specsearch ingest``. The source is
read and merged by ``specsearch.surveys.sources`` (its docstring has the rules: dispatch by
content, rejects, merging by source_id, memory); the merged rows stream into the store through
``Store.write_release`` (temporary files, then rename; manifest last). Re-running the same ingest
writes byte-identical shard files.

Memory. ``ingest`` never holds a release: reader batches are sorted by source_id into runs of
about 128 MB spilled to a scratch folder inside the store (``Store.scratch``, removed
afterwards), and the runs are merged 4096 source_ids at a time straight into the shard files.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..files import ROWS_PER_FILE
from ..progress import bar as progress_bar
from ..schema import check_release
from ..store import Store
from ..surveys.sources import merged_chunks, scan_source, tidy_rejects


def source_fingerprint(source: str | os.PathLike) -> str:
    """A digest of the files under ``source`` (relative names, sizes, modification times): the
    same untouched folder gives the same fingerprint. Hidden files are not part of a source."""
    source = Path(source)
    files = (
        [source]
        if source.is_file()
        else sorted(
            p
            for p in source.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
        )
    )
    digest = hashlib.sha256()
    for path in files:
        info = path.stat()
        name = path.name if path == source else path.relative_to(source).as_posix()
        digest.update(f"{name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class IngestResult:
    """What one ingest wrote: stars per modality, files read, rejects, where, how long."""

    release: str
    stars: int
    lrs: int
    xp: int
    both: int
    files: int
    rejected: int
    side_tables: int
    shard_dir: Path
    seconds: float

    def __str__(self) -> str:
        skipped = f", {self.side_tables} side tables skipped" if self.side_tables else ""
        return (
            f"ingested {self.release}: {self.stars} stars ({self.lrs} LRS, {self.xp} XP, "
            f"{self.both} both) from {self.files} files, {self.rejected} rejected{skipped} "
            f"-> {self.shard_dir}"
        )


def ingest(
    source: str | os.PathLike,
    store: str | os.PathLike | Store,
    release: str,
    *,
    batch_size: int = 256,
    rows_per_batch: int = 4096,
    rows_per_file: int = ROWS_PER_FILE,
    workers: int | None = None,
    show_progress: bool = True,
    replace: bool = False,
) -> IngestResult:
    """Ingest ``source`` (a file or a folder) as release ``release`` of ``store``.

    Memory stays bounded whatever the size of the release: reader batches are sorted by
    source_id and spilled to a scratch folder inside the store, then merged slice by slice
    straight into the shard files (see read_source for the rules).
    batch_size: LAMOST files resampled together; rows_per_batch: rows per batch for tables;
    rows_per_file: stars per shard file; workers: processes reading LAMOST and Gaia XP files
    (default one per core; one LAMOST batch or one XP file is read in this process).
    A release already in the store needs ``replace``: its old rows and everything derived from
    them (embeddings, scores, report) leave the store in the same commit as the new rows come.
    Raises InputError for a bad single file, an empty release or an existing release without
    ``replace`` (the store is then left as it was; a store this call created is removed).
    """
    start = time.perf_counter()
    source = Path(source)
    check_release(release)
    root = store.root if isinstance(store, Store) else Path(store)
    created = not root.exists()
    counts = np.zeros(3, dtype=np.int64)  # stars with an LRS, an XP, both

    def counted(chunks: Iterator[pa.Table]) -> Iterator[pa.Table]:
        for merged in chunks:
            has_lrs = merged.column("lrs_flux").is_valid().to_numpy(zero_copy_only=False)
            has_xp = merged.column("xp_flux").is_valid().to_numpy(zero_copy_only=False)
            counts[:] += [has_lrs.sum(), has_xp.sum(), (has_lrs & has_xp).sum()]
            yield merged

    try:
        store = store if isinstance(store, Store) else Store(root)
        with (
            store.writing(f"ingest {release}"),
            progress_bar(show_progress) as bar,
            store.scratch("ingest", release) as spill_dir,
        ):
            store.check_new_release(release, replace)  # before reading a file
            runs, formats = scan_source(
                source,
                release,
                batch_size,
                rows_per_batch,
                bar,
                spill_dir,
                workers or os.cpu_count() or 1,
            )
            chunks = merged_chunks(runs, source, release, bar)
            first = next(chunks)  # an empty release raises here, before the store is written
            entry = store.write_release(
                release,
                counted(itertools.chain([first], chunks)),
                rejects=lambda: tidy_rejects(runs.rejects, runs.names),
                sources=[str(source.resolve())],
                rows_per_file=rows_per_file,
                source_fingerprint=source_fingerprint(source),
                replace=replace,
            )
    except BaseException:
        if created:  # a failed first ingest leaves no half-made store behind
            shutil.rmtree(root, ignore_errors=True)
        raise
    skipped = sum(kind == "side_table" for kind in formats)
    return IngestResult(
        release=release,
        stars=entry["rows"],
        lrs=int(counts[0]),
        xp=int(counts[1]),
        both=int(counts[2]),
        files=len(formats) - skipped,
        rejected=entry["rejects"],
        side_tables=skipped,
        shard_dir=store.shard_dir(release),
        seconds=time.perf_counter() - start,
    )
