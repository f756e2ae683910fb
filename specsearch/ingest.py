"""Ingest: raw survey files or shards -> one release of canonical shards in the store.

``ingest(source, store, release)`` is the library twin of ``specsearch ingest``.

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
rejects are sorted by file and row, with file names relative to ``source``. Re-running the same
ingest writes byte-identical shard files. Everything goes through ``Store.write_release``
(temporary files, then rename; manifest last).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import InputError, SpecsearchError
from .schema import (
    REJECTS_SCHEMA,
    SHARD_SCHEMA,
    TRUTH_SCHEMA,
    column_matrix,
    validate_shard,
)
from .store import Store, check_release
from .surveys.lamost import looks_like_lamost_fits, read_lamost
from .surveys.shards import (
    FILE_COLUMN,
    PROVENANCE_COLUMNS,
    ROW_COLUMN,
    looks_like_shards,
    read_shards,
    rejects_table,
)

SNR_LRS = "_snr_lrs"
SNR_XP = "_snr_xp"
_INTERNAL = (*PROVENANCE_COLUMNS, SNR_LRS, SNR_XP)
_UNKNOWN = "not a LAMOST LRS FITS file, Gaia XP product or canonical shard"
# errors a third-party reader may raise for a file it cannot read
_READ_ERRORS = (SpecsearchError, OSError, ValueError, KeyError, EOFError, pa.ArrowException)


# ------------------------------------------------------------------ formats


def _gaia_xp_module() -> ModuleType | None:
    """The Gaia XP reader, or None where this installation does not have it yet."""
    try:
        return importlib.import_module("specsearch.surveys.gaia_xp")
    except ModuleNotFoundError as err:
        if err.name == "specsearch.surveys.gaia_xp":
            return None
        raise


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
    gaia_xp = _gaia_xp_module()
    if gaia_xp is not None and gaia_xp.looks_like_gaia_xp(path):
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
    return _median_snr(np.abs(flux) * np.sqrt(np.where(ivar > 0, ivar, np.nan)))


def median_snr_xp(flux: np.ndarray, flux_error: np.ndarray) -> np.ndarray:
    """Median S/N, |flux| / error over pixels with a positive error; (n, 343) -> (n,), 0 if none."""
    return _median_snr(np.abs(flux) / np.where(flux_error > 0, flux_error, np.nan))


def _median_snr(snr: np.ndarray) -> np.ndarray:
    snr = np.where(np.isfinite(snr), snr, np.nan)
    out = np.zeros(len(snr))
    some = ~np.all(np.isnan(snr), axis=1)
    if some.any():
        out[some] = np.nanmedian(snr[some], axis=1)
    return out


def _conform(table: pa.Table, release: str, file: str) -> pa.Table:
    """A reader's batch -> contract columns (cast), extras, provenance and S/N columns."""
    n = table.num_rows
    table = table.drop_columns([c for c in ("release", SNR_LRS, SNR_XP) if c in table.column_names])
    table = table.append_column("release", pa.array([release] * n, type=pa.string()))
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
        elif name == "release":
            columns[name] = pa.array([release] * len(out_id), type=pa.string())
        elif name in ("lrs_flux", "lrs_ivar"):
            columns[name] = lrs_rows.column(name)
        elif name in ("xp_flux", "xp_flux_error"):
            columns[name] = xp_rows.column(name)
        else:
            columns[name] = pc.coalesce(lrs_rows.column(name), xp_rows.column(name))
    merged = validate_shard(pa.table(columns), where=f"release {release}")
    return merged, rejects_table(release, records)


# ------------------------------------------------------------------ the stage


def _progress(enabled: bool = True) -> Progress:
    """A file-count progress bar on stderr; drawn only on a terminal, and cleared when done."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )


def _read_all(
    files: list[Path],
    formats: list[str],
    release: str,
    single: bool,
    batch_size: int,
    rows_per_batch: int,
    progress: Progress,
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Run every file through its reader; yields (conformed rows, rejects) per batch."""
    on_error = "raise" if single else "reject"
    task = progress.add_task("reading", total=len(files))
    lamost = [f for f, kind in zip(files, formats, strict=True) if kind == "lamost"]
    for start, (shards, rejects) in zip(
        range(0, len(lamost), batch_size),
        read_lamost(lamost, release, batch_size, on_error=on_error, provenance=True),
        strict=True,
    ):
        progress.advance(task, min(batch_size, len(lamost) - start))
        yield _conform(shards, release, ""), rejects
    for file, kind in zip(files, formats, strict=True):
        if kind == "lamost":
            continue
        if kind == "shards":
            for shards, rejects in read_shards(
                file, release, rows_per_batch, on_error=on_error, provenance=True
            ):
                yield _conform(shards, release, str(file)), rejects
        elif kind == "gaia_xp":
            yield from _read_gaia_xp(file, release, rows_per_batch, single)
        elif kind == "unknown":
            if single:
                raise InputError(f"{file}: {_UNKNOWN}")
            yield (
                _conform(SHARD_SCHEMA.empty_table(), release, str(file)),
                rejects_table(release, [{"file": str(file), "reason": _UNKNOWN}]),
            )
        elif kind == "side_table" and single:
            raise InputError(f"{file}: a rejects or truth table, not survey spectra")
        progress.advance(task)


def _read_gaia_xp(
    file: Path, release: str, rows_per_batch: int, single: bool
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """One XP file, all or nothing: a file that fails part-way contributes no rows."""
    gaia_xp = _gaia_xp_module()
    assert gaia_xp is not None  # detect_format only says "gaia_xp" when the module exists
    batches = []
    try:
        for shards, rejects in gaia_xp.read_gaia_xp(file, release, rows_per_batch):
            batches.append((_conform(shards, release, str(file)), rejects))
    except _READ_ERRORS as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not message.startswith(str(file)):
            message = f"{file}: {message}"
        if single:
            raise InputError(message) from None
        reason = f"unreadable Gaia XP product: {message.removeprefix(f'{file}: ')}"
        batches = [(None, rejects_table(release, [{"file": str(file), "reason": reason}]))]
    for shards, rejects in batches:
        if shards is None:
            shards = _conform(SHARD_SCHEMA.empty_table(), release, str(file))
        yield shards, rejects


def _tidy_rejects(rejects: list[pa.Table], release: str, names: dict[str, str]) -> pa.Table:
    """One rejects table: release set, files named relative to the source, sorted by file, row."""
    table = pa.concat_tables([r.select(REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA) for r in rejects])
    files = [names.get(f, f) if f is not None else None for f in table.column("file").to_pylist()]
    table = table.set_column(1, REJECTS_SCHEMA.field("file"), pa.array(files, type=pa.string()))
    table = table.set_column(
        0, REJECTS_SCHEMA.field("release"), pa.array([release] * len(files), pa.string())
    )
    order = pc.sort_indices(
        table, sort_keys=[("file", "ascending", "at_start"), ("row", "ascending", "at_start")]
    )
    return table.take(order)


def read_source(
    source: str | os.PathLike,
    release: str = "QUERY",
    *,
    batch_size: int = 256,
    rows_per_batch: int = 4096,
    progress: bool = False,
) -> tuple[pa.Table, pa.Table, list[str]]:
    """Read a file or folder into merged canonical rows without writing anything.

    Returns (rows sorted by source_id, rejects, the detected format of each file). Raises
    InputError for a bad single file or when no usable spectrum is left.
    """
    check_release(release)
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or directory")
    single = source.is_file()
    files = _source_files(source)
    if not files:
        raise InputError(f"{source}: empty folder, nothing to ingest")
    names = {str(f): (f.name if single else f.relative_to(source).as_posix()) for f in files}

    tables = [_conform(SHARD_SCHEMA.empty_table(), release, "")]  # concat needs one table
    rejects = []
    with _progress(progress) as bar:
        task = bar.add_task("scanning", total=len(files))
        formats = []
        for file in files:
            formats.append(detect_format(file))
            bar.advance(task)
        for shards, rejected in _read_all(
            files, formats, release, single, batch_size, rows_per_batch, bar
        ):
            tables.append(shards)
            rejects.append(rejected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            rows = pa.concat_tables(tables, promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise InputError(
                f"{source}: files disagree on a column type ({str(err).splitlines()[0]})"
            ) from None
    # name files relative to the source in every message and rejects row
    shown = [names.get(f, f) for f in rows.column(FILE_COLUMN).to_pylist()]
    rows = rows.set_column(
        rows.schema.get_field_index(FILE_COLUMN), FILE_COLUMN, pa.array(shown, type=pa.string())
    )
    merged, duplicates = merge_by_source_id(rows, release)
    rejected = _tidy_rejects([*rejects, duplicates], release, names)
    if merged.num_rows == 0:
        first = ""
        if rejected.num_rows:
            first = f"; first: {rejected.column('file')[0]}: {rejected.column('reason')[0]}"
        raise InputError(
            f"{source}: no usable spectra for release {release} ({rejected.num_rows} rejected{first})"
        )
    return merged, rejected, formats


def ingest(
    source: str | os.PathLike,
    store: str | os.PathLike | Store,
    release: str,
    *,
    batch_size: int = 256,
    rows_per_batch: int = 4096,
    progress: bool = True,
) -> str:
    """Ingest ``source`` (a file or a folder) as release ``release`` of ``store`` (see read_source).

    batch_size: LAMOST files resampled together; rows_per_batch: rows per batch for tables.
    Returns a one-line summary. Raises InputError for a bad single file or an empty release.
    """
    source = Path(source)
    merged, rejected, formats = read_source(
        source, release, batch_size=batch_size, rows_per_batch=rows_per_batch, progress=progress
    )
    store = store if isinstance(store, Store) else Store(store)
    store.write_release(release, [merged], rejects=rejected, sources=[str(source.resolve())])
    has_lrs = merged.column("lrs_flux").is_valid().to_numpy(zero_copy_only=False)
    has_xp = merged.column("xp_flux").is_valid().to_numpy(zero_copy_only=False)
    skipped = sum(kind == "side_table" for kind in formats)
    return (
        f"ingested {release}: {merged.num_rows} stars ({int(has_lrs.sum())} LRS, {int(has_xp.sum())} XP, "
        f"{int((has_lrs & has_xp).sum())} both) from {len(formats) - skipped} files, "
        f"{rejected.num_rows} rejected"
        + (f", {skipped} side tables skipped" if skipped else "")
        + f" -> {store.shard_dir(release)}"
    )
