"""Any survey source -> merged canonical rows: what ``ingest`` writes into a store and what a
query file (``search --spectrum``, ``predict FILE``) is read with.

Dispatch is by content, never by file name. Each file of ``source`` (the file itself, or every
file under the folder, recursively and sorted; names starting with '.' are skipped) is:

1. a LAMOST LRS FITS file (either layout)  -> ``surveys.lamost.read_lamost``, batched over files;
2. a canonical shard (Parquet)             -> ``surveys.shards.read_shards``;
3. a Gaia XP product                       -> ``surveys.gaia_xp.read_gaia_xp``;
4. a Parquet rejects or truth table (e.g. the ``truth.parquet`` that ``simulate`` writes beside
   its shards) -> skipped, and counted as skipped in the summary;
5. anything else -> a rejects row "not a LAMOST LRS FITS file, Gaia XP product or canonical shard".

Bad input. With a folder, a file that cannot be used (corrupt, truncated, unknown type) is a
rejects row naming the file and the reason, and the run goes on. With a single file, the same
problem is an ``InputError``: one line naming the file (the CLI prints it and exits 2). Rows
that a reader rejects (NaN-only flux, wrong coverage, wrong array length, ...) are rejects rows in
both cases; a release left without any row is an ``InputError``.

Merging. Rows are merged by ``source_id``: a LAMOST row and a Gaia XP row of the same star
become one row with both spectra. Where a modality occurs more than once for a source_id, the
spectrum with the highest median S/N is kept (ties: the first in sorted file order) and each
other one is a rejects row "duplicate source_id ...". Scalar columns (obsid, labels, extra
columns) come from the row that gave the LRS, filled from the XP row where null.

Output. Every row's ``release`` is ``release``; rows are sorted by ``source_id`` (LAMOST-only
stars without a Gaia id have negative pseudo ids, see ``surveys.lamost``, and sort first);
rejects are sorted by file and row, with file names relative to ``source``.

Memory. With a spill folder (``ingest`` gives one inside the store) a release is never held:
reader batches are sorted by source_id into runs of about 128 MB spilled there, and the runs are
merged 4096 source_ids at a time (``merged_chunks``). Peak memory hardly grows with
the release: about 1.0 GB at 20k stars and 1.1 GB at 200k, both modalities (see
benchmarks/bench_ingest.py). What does grow is 16 bytes a star (source_id and reading order) and
one 64-row group per run during the merge: about 1.2 GB more for a 10M-star release (1,100 runs).

Workers. With ``workers`` > 1, LAMOST files are read in batches and Gaia XP products one whole
file at a time by worker processes, at most 2 x workers jobs ahead of the merge (so an XP product
in flight costs its converted rows in memory); results are added in file order, and the release
is the same as with one process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.progress import Progress

from ..errors import InputError, SpecsearchError
from ..pool import parallel_map
from ..progress import bar as progress_bar
from ..schema import (
    REJECTS_SCHEMA,
    SHARD_SCHEMA,
    TRUTH_SCHEMA,
    check_release,
    column_matrix,
    rejects_table,
    validate_shard,
)
from .gaia_xp import looks_like_gaia_xp, read_gaia_xp
from .lamost import looks_like_lamost_fits, read_lamost
from .shards import (
    FILE_COLUMN,
    PROVENANCE_COLUMNS,
    ROW_COLUMN,
    looks_like_shards,
    read_shards,
    screen_implausible,
)

SNR_LRS = "_snr_lrs"
SNR_XP = "_snr_xp"
_ARRIVAL = "_arrival"  # a row's position in reading order: the merge's tie-break
_INTERNAL = (*PROVENANCE_COLUMNS, SNR_LRS, SNR_XP, _ARRIVAL)
_RUN_ROW_GROUP = 64  # rows per row group of a spilled run: the merge keeps one per run
_RUN_BYTES = 128 << 20  # reader batches gathered before a run is sorted and spilled
_MERGE_ROWS = 4096  # output source_ids merged at a time: one row group of the shard files
_UNKNOWN = "not a LAMOST LRS FITS file, Gaia XP product or canonical shard"
# errors a third-party reader may raise for a file it cannot read
_READ_ERRORS = (SpecsearchError, OSError, ValueError, KeyError, EOFError, pa.ArrowException)


# ------------------------------------------------------------------ formats


def _is_side_table(path: Path) -> bool:
    """A Parquet rejects or truth table: metadata that travels with shards, not survey rows."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                return False
        names = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException):
        return False
    return any(set(schema.names) <= names for schema in (REJECTS_SCHEMA, TRUTH_SCHEMA))


def detect_format(path: str | os.PathLike) -> str:
    """What a file holds: "lamost", "shards", "gaia_xp", "side_table" (rejects/truth) or "unknown"."""
    path = Path(path)
    if looks_like_lamost_fits(path):
        return "lamost"
    if looks_like_shards(path):
        return "shards"
    if looks_like_gaia_xp(path):
        return "gaia_xp"
    if _is_side_table(path):
        return "side_table"
    return "unknown"


def _source_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
    )


# ------------------------------------------------------------------ per-row bookkeeping


def median_snr_lrs(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Median S/N over good pixels, |flux| sqrt(ivar); flux, ivar (n, 1462) -> (n,), 0 if none."""
    with np.errstate(over="ignore", invalid="ignore"):  # wild values are screened later
        return _median_snr(np.abs(flux) * np.sqrt(np.where(ivar > 0, ivar, np.nan)))


def median_snr_xp(flux: np.ndarray, flux_error: np.ndarray) -> np.ndarray:
    """Median S/N, |flux| / error over pixels with a positive error; (n, 343) -> (n,), 0 if none."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _median_snr(np.abs(flux) / np.where(flux_error > 0, flux_error, np.nan))


def _median_snr(snr: np.ndarray) -> np.ndarray:
    snr = np.where(np.isfinite(snr), snr, np.nan)
    out = np.zeros(len(snr))
    some = ~np.all(np.isnan(snr), axis=1)
    if some.any():
        out[some] = np.nanmedian(snr[some], axis=1)
    return out


def _conform(table: pa.Table, file: str) -> pa.Table:
    """A reader's batch (its rows carry their release) -> contract columns (cast), extras,
    provenance and S/N columns."""
    n = table.num_rows
    table = table.drop_columns([c for c in (SNR_LRS, SNR_XP) if c in table.column_names])
    for field in SHARD_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(n, type=field.type))
    if FILE_COLUMN not in table.column_names:
        table = table.append_column(FILE_COLUMN, pa.array([file] * n, type=pa.string()))
    if ROW_COLUMN not in table.column_names:
        table = table.append_column(ROW_COLUMN, pa.nulls(n, type=pa.int64()))
    extras = [c for c in table.column_names if c not in SHARD_SCHEMA.names]
    try:
        contract = table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        raise InputError(f"{file}: {str(err).splitlines()[0]}") from None
    for name in extras:
        contract = contract.append_column(table.schema.field(name), table.column(name))
    snr_lrs = median_snr_lrs(
        column_matrix(contract, "lrs_flux"), column_matrix(contract, "lrs_ivar")
    )
    snr_xp = median_snr_xp(
        column_matrix(contract, "xp_flux"), column_matrix(contract, "xp_flux_error")
    )
    contract = contract.append_column(SNR_LRS, pa.array(snr_lrs, type=pa.float64()))
    return contract.append_column(SNR_XP, pa.array(snr_xp, type=pa.float64()))


def merge_by_source_id(rows: pa.Table, release: str) -> tuple[pa.Table, pa.Table]:
    """Merge conformed reader rows into one row per source_id (see the module doc).

    ``rows`` carries the provenance (``_file``, ``_row``) and S/N (``_snr_lrs``, ``_snr_xp``)
    columns; its order is the tie-break. Returns (shards sorted by source_id, validated against
    SHARD_SCHEMA with extra columns kept, and the duplicate rejects).
    """
    source_id = rows.column("source_id").to_numpy()
    arrival = np.arange(rows.num_rows)
    files = rows.column(FILE_COLUMN).to_pylist()
    obsid = rows.column("obsid").to_pylist()
    line_in_file = rows.column(ROW_COLUMN).to_pylist()
    winners: dict[str, np.ndarray] = {}
    records = []
    for modality, flux_name, snr_name in (("LRS", "lrs_flux", SNR_LRS), ("XP", "xp_flux", SNR_XP)):
        idx = np.flatnonzero(rows.column(flux_name).is_valid().to_numpy(zero_copy_only=False))
        snr = rows.column(snr_name).to_numpy()
        order = idx[np.lexsort((arrival[idx], -snr[idx], source_id[idx]))]
        first = np.ones(len(order), dtype=bool)
        first[1:] = source_id[order][1:] != source_id[order][:-1]
        winners[modality] = order[first]
        losers = order[~first]
        kept = winners[modality][np.searchsorted(source_id[winners[modality]], source_id[losers])]
        records += [
            {
                "file": files[i],
                "row": line_in_file[i],
                "source_id": int(source_id[i]),
                "obsid": obsid[i],
                "reason": f"duplicate source_id: {modality} kept from {files[k]} "
                f"(median S/N {snr[k]:.1f} vs {snr[i]:.1f})",
            }
            for i, k in zip(losers, kept, strict=True)
        ]
    out_id = np.union1d(source_id[winners["LRS"]], source_id[winners["XP"]])

    def pick(modality: str) -> pa.Table:
        position = np.full(len(out_id), -1, dtype=np.int64)
        position[np.searchsorted(out_id, source_id[winners[modality]])] = winners[modality]
        return rows.take(pa.array(position, mask=position < 0))

    lrs_rows, xp_rows = pick("LRS"), pick("XP")
    columns = {}
    for name in rows.column_names:
        if name in _INTERNAL:
            continue
        if name == "source_id":
            columns[name] = pa.array(out_id, type=pa.int64())
        elif name in ("lrs_flux", "lrs_ivar"):
            columns[name] = lrs_rows.column(name)
        elif name in ("xp_flux", "xp_flux_error"):
            columns[name] = xp_rows.column(name)
        else:
            columns[name] = pc.coalesce(lrs_rows.column(name), xp_rows.column(name))
    merged = validate_shard(pa.table(columns), where=f"release {release}")
    return merged, rejects_table(release, records)


# ------------------------------------------------------------------ the stage


class _Runs:
    """The conformed reader batches of one release, sorted by source_id in "runs".

    In memory (``spill_dir`` None, for query files) every batch is a run. With a ``spill_dir``
    batches gather until ``budget_bytes``, are sorted and written as one Parquet run with small
    row groups; only source_id and arrival (16 bytes a row) stay in memory. The merge walks all
    runs in source_id order, reading each row group once and keeping one per run: memory is
    about ``budget_bytes`` plus one row group per run, whatever the size of the release.

    ``mark`` and ``rollback`` drop what a file added when it fails part-way (all or nothing).
    """

    def __init__(
        self, source: Path, spill_dir: Path | None, names: dict[str, str], budget_bytes: int
    ):
        self.source = source
        self.spill_dir = spill_dir
        self.names = names
        self.budget_bytes = budget_bytes
        self.runs: list[pa.Table | Path] = []
        self.ids: list[np.ndarray] = []  # per run, sorted
        self.arrivals: list[np.ndarray] = []  # per run, in the order of ids
        self.pending: list[pa.Table] = []
        self.schemas: list[tuple[int, pa.Schema]] = []  # (first arrival, schema) per batch
        self.rejects: list[pa.Table] = []
        self.dropped: list[tuple[int, int]] = []  # arrival ranges of files that failed
        self.rows = 0
        self._cache: dict[int, tuple[int, pa.Table]] = {}  # run -> (row group, its rows)
        self._files: dict[int, pq.ParquetFile] = {}

    # --- reading ------------------------------------------------------------------------------

    def add(self, shards: pa.Table, rejects: pa.Table | None = None) -> None:
        if rejects is not None and rejects.num_rows:
            self.rejects.append(rejects)
        if not shards.num_rows:
            return
        release = shards.column("release")[0].as_py()
        shards, implausible = screen_implausible(shards)  # every reader's rows pass here
        if implausible:
            self.rejects.append(rejects_table(release, implausible))
        if not shards.num_rows:
            return
        # files named as the user will see them; arrival order kept for the merge's tie-break
        shown = [self.names.get(f, f) for f in shards.column(FILE_COLUMN).to_pylist()]
        shards = shards.set_column(
            shards.schema.get_field_index(FILE_COLUMN), FILE_COLUMN, pa.array(shown, pa.string())
        )
        arrival = np.arange(self.rows, self.rows + shards.num_rows, dtype=np.int64)
        shards = shards.append_column(_ARRIVAL, pa.array(arrival))
        self.schemas.append((self.rows, shards.schema))
        self.rows += shards.num_rows
        self.pending.append(shards)
        if self.spill_dir is None or sum(t.nbytes for t in self.pending) >= self.budget_bytes:
            self.flush()

    def flush(self) -> None:
        """Sort the pending batches by source_id into one run."""
        if not self.pending:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                table = pa.concat_tables(self.pending, promote_options="default")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise InputError(
                    f"{self.source}: files disagree on a column type ({str(err).splitlines()[0]})"
                ) from None
        self.pending = []
        source_id = table.column("source_id").to_numpy()
        order = np.argsort(source_id, kind="stable")
        table = table.take(pa.array(order))
        self.ids.append(source_id[order])
        self.arrivals.append(table.column(_ARRIVAL).to_numpy())
        if self.spill_dir is None:
            self.runs.append(table)
            return
        path = self.spill_dir / f"run-{len(self.runs):06d}.parquet"
        pq.write_table(  # a scratch file read once: no compression, no dictionaries
            table, path, row_group_size=_RUN_ROW_GROUP, compression="none", use_dictionary=False
        )
        self.runs.append(path)

    def mark(self) -> tuple[int, int]:
        return self.rows, len(self.rejects)

    def rollback(self, mark: tuple[int, int]) -> None:
        rows, rejects = mark
        self.dropped.append((rows, self.rows))
        del self.rejects[rejects:]

    def _kept(self, arrival: np.ndarray) -> np.ndarray:
        keep = np.ones(len(arrival), dtype=bool)
        for start, stop in self.dropped:
            keep &= (arrival < start) | (arrival >= stop)
        return keep

    # --- merging ------------------------------------------------------------------------------

    def schema(self) -> pa.Schema:
        """One schema for every row kept: the contract columns first, extras as files have them."""
        schemas = [s for first, s in self.schemas if self._kept(np.array([first]))[0]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                return pa.unify_schemas(schemas, promote_options="default")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise InputError(
                    f"{self.source}: files disagree on a column type ({str(err).splitlines()[0]})"
                ) from None

    def unique_ids(self) -> np.ndarray:
        self.flush()
        ids = [i[self._kept(a)] for i, a in zip(self.ids, self.arrivals, strict=True)]
        return np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)

    def _row_group(self, index: int, group: int) -> pa.Table:
        cached = self._cache.get(index)
        if cached is None or cached[0] != group:
            if index not in self._files:
                self._files[index] = pq.ParquetFile(self.runs[index])
            cached = (group, self._files[index].read_row_group(group))
            self._cache[index] = cached
        return cached[1]

    def rows_between(self, low: int, high: int, schema: pa.Schema) -> pa.Table:
        """Every kept row with low <= source_id <= high, from every run; the rows of one source_id
        in reading order (what the merge's tie-break needs).

        Calls must come in increasing source_id order: a spilled run's row groups are read once.
        """
        parts = []
        for index, (run, ids) in enumerate(zip(self.runs, self.ids, strict=True)):
            first = int(np.searchsorted(ids, low, side="left"))
            stop = int(np.searchsorted(ids, high, side="right"))
            if stop <= first:
                continue
            if isinstance(run, Path):
                pieces = []
                for group in range(first // _RUN_ROW_GROUP, (stop - 1) // _RUN_ROW_GROUP + 1):
                    offset = group * _RUN_ROW_GROUP
                    rows = self._row_group(index, group)
                    lo, hi = max(first - offset, 0), min(stop - offset, rows.num_rows)
                    pieces.append(rows.slice(lo, hi - lo))
                table = pa.concat_tables(pieces)
            else:
                table = run.slice(first, stop - first)
            if self.dropped:
                keep = self._kept(self.arrivals[index][first:stop])
                table = table.filter(pa.array(keep))
            parts.append(_to_schema(table, schema))
        # runs are in reading order and sorted stably, so the rows of one source_id are too
        return pa.concat_tables(parts)


def _to_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Columns in the schema's order and types; a column the table lacks is null."""
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, type=f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _read_all(
    files: list[Path],
    formats: list[str],
    release: str,
    single: bool,
    batch_size: int,
    rows_per_batch: int,
    progress: Progress,
    runs: _Runs,
    workers: int = 1,
) -> None:
    """Run every file through its reader, adding each batch (conformed rows, rejects) to runs."""
    on_error = "raise" if single else "reject"
    task = progress.add_task("reading", total=len(files))
    lamost = [f for f, kind in zip(files, formats, strict=True) if kind == "lamost"]
    for start, (shards, rejects) in zip(
        range(0, len(lamost), batch_size),
        read_lamost(
            lamost, release, batch_size, on_error=on_error, provenance=True, workers=workers
        ),
        strict=True,
    ):
        progress.advance(task, min(batch_size, len(lamost) - start))
        runs.add(_conform(shards, ""), rejects)
    xp_files = [f for f, kind in zip(files, formats, strict=True) if kind == "gaia_xp"]
    with contextlib.ExitStack() as stack:
        xp_results = None
        if workers > 1 and len(xp_files) > 1:  # XP files read and converted in parallel
            job = functools.partial(_read_xp_file, release=release, rows_per_batch=rows_per_batch)
            xp_results = stack.enter_context(parallel_map(job, xp_files, workers))
        for file, kind in zip(files, formats, strict=True):
            if kind == "lamost":
                continue
            if kind == "shards":
                for shards, rejects in read_shards(
                    file, release, rows_per_batch, on_error=on_error, provenance=True
                ):
                    runs.add(_conform(shards, str(file)), rejects)
            elif kind == "gaia_xp":
                if xp_results is not None:
                    batches, error = next(xp_results)
                    for shards, rejects in batches:
                        runs.add(shards, rejects)
                else:
                    mark = runs.mark()
                    try:
                        for shards, rejects in _xp_batches(file, release, rows_per_batch):
                            runs.add(shards, rejects)
                        error = None
                    except _READ_ERRORS as err:
                        runs.rollback(mark)
                        error = _xp_error(file, err)
                if error is not None:
                    if single:
                        raise InputError(error)
                    reason = f"unreadable Gaia XP product: {error.removeprefix(f'{file}: ')}"
                    runs.add(
                        SHARD_SCHEMA.empty_table(),
                        rejects_table(release, [{"file": str(file), "reason": reason}]),
                    )
            elif kind == "unknown":
                if single:
                    raise InputError(f"{file}: {_UNKNOWN}")
                runs.add(
                    SHARD_SCHEMA.empty_table(),
                    rejects_table(release, [{"file": str(file), "reason": _UNKNOWN}]),
                )
            elif kind == "side_table" and single:
                raise InputError(f"{file}: a rejects or truth table, not survey spectra")
            progress.advance(task)


def _xp_batches(
    file: Path, release: str, rows_per_batch: int
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """One Gaia XP product as conformed batches (rows, rejects)."""
    for shards, rejects in read_gaia_xp(file, release, rows_per_batch):
        yield _conform(shards, str(file)), rejects


def _xp_error(file: Path, err: BaseException) -> str:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    return message if message.startswith(str(file)) else f"{file}: {message}"


def _read_xp_file(
    file: Path, release: str, rows_per_batch: int
) -> tuple[list[tuple[pa.Table, pa.Table]], str | None]:
    """A worker's job: one whole XP file, all or nothing -> (batches, None) or ([], error)."""
    try:
        return list(_xp_batches(file, release, rows_per_batch)), None
    except _READ_ERRORS as err:
        return [], _xp_error(file, err)


def tidy_rejects(rejects: list[pa.Table], names: dict[str, str]) -> pa.Table:
    """One rejects table: files named relative to the source, sorted by file, row."""
    if not rejects:
        return REJECTS_SCHEMA.empty_table()
    table = pa.concat_tables([r.select(REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA) for r in rejects])
    files = [names.get(f, f) if f is not None else None for f in table.column("file").to_pylist()]
    table = table.set_column(1, REJECTS_SCHEMA.field("file"), pa.array(files, type=pa.string()))
    order = pc.sort_indices(
        table, sort_keys=[("file", "ascending", "at_start"), ("row", "ascending", "at_start")]
    )
    return table.take(order)


def scan_source(
    source: Path,
    release: str,
    batch_size: int,
    rows_per_batch: int,
    bar: Progress,
    spill_dir: Path | None,
    workers: int = 1,
) -> tuple[_Runs, list[str]]:
    """Read every file of ``source`` into runs; returns them with each file's detected format."""
    check_release(release)
    if not source.exists():
        raise InputError(f"{source}: no such file or directory")
    single = source.is_file()
    files = _source_files(source)
    if not files:
        raise InputError(f"{source}: empty folder, nothing to ingest")
    names = {str(f): (f.name if single else f.relative_to(source).as_posix()) for f in files}
    runs = _Runs(source, spill_dir, names, _RUN_BYTES)
    task = bar.add_task("scanning", total=len(files))
    formats = []
    for file in files:
        formats.append(detect_format(file))
        bar.advance(task)
    _read_all(files, formats, release, single, batch_size, rows_per_batch, bar, runs, workers)
    return runs, formats


def merged_chunks(runs: _Runs, source: Path, release: str, bar: Progress) -> Iterator[pa.Table]:
    """The merged release in source_id order, _MERGE_ROWS source_ids at a time. The duplicates
    found are appended to ``runs.rejects``. Raises InputError before yielding anything when no
    row is left."""
    ids = runs.unique_ids()
    if not len(ids):
        rejected = tidy_rejects(runs.rejects, runs.names)
        first = ""
        if rejected.num_rows:
            first = f"; first: {rejected.column('file')[0]}: {rejected.column('reason')[0]}"
        raise InputError(
            f"{source}: no usable spectra for release {release} ({rejected.num_rows} rejected{first})"
        )
    schema = runs.schema()
    task = bar.add_task("merging", total=len(ids))
    for start in range(0, len(ids), _MERGE_ROWS):
        chunk = ids[start : start + _MERGE_ROWS]
        rows = runs.rows_between(int(chunk[0]), int(chunk[-1]), schema)
        merged, duplicates = merge_by_source_id(rows, release)
        if duplicates.num_rows:
            runs.rejects.append(duplicates)
        bar.advance(task, len(chunk))
        yield merged


def read_source(
    source: str | os.PathLike,
    release: str = "QUERY",
    *,
    batch_size: int = 256,
    rows_per_batch: int = 4096,
    show_progress: bool = False,
) -> tuple[pa.Table, pa.Table, list[str]]:
    """Read a file or folder into merged canonical rows in memory, without writing anything
    (query spectra; ``ingest`` streams instead).

    Returns (rows sorted by source_id, rejects, the detected format of each file). Raises
    InputError for a bad single file or when no usable spectrum is left.
    """
    source = Path(source)
    with progress_bar(show_progress) as bar:
        runs, formats = scan_source(source, release, batch_size, rows_per_batch, bar, None)
        chunks = list(merged_chunks(runs, source, release, bar))
    return pa.concat_tables(chunks), tidy_rejects(runs.rejects, runs.names), formats
