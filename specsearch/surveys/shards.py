"""Canonical shards (Parquet) as an ingest source, plus the row checks every reader shares.

A canonical shard follows ``specsearch.schema.SHARD_SCHEMA``. Shards written by other tools may
use variable-length lists instead of fixed-size ones, lack the label columns, or carry extra
columns; all of that is accepted. What is checked, row by row (vectorised over a batch):

- ``source_id`` null -> the row is rejected;
- an array of the wrong length, a flux without its ivar/error (or the reverse) -> that modality
  is dropped from the row;
- LRS pixels with NaN/inf flux or negative/non-finite ivar -> ivar 0 (flux 0); fewer than
  ``MIN_LRS_GOOD_FRACTION`` good pixels -> the LRS is dropped;
- XP pixels with non-finite flux, or an error that is not finite and positive -> the XP is
  dropped (the XP grid has no per-pixel mask, so a partial XP spectrum is not usable).

A row that keeps one modality after a drop stays in the output and the drop is written to the
rejects table ("... (LRS dropped, row kept)"); a row that keeps none is rejected. Rows are never
dropped silently.

File-level problems (not Parquet, a missing ``source_id`` column, a column whose type cannot
be cast to the contract's) are a rejects row for the file with ``on_error="reject"`` (the default)
or an ``InputError`` naming the file with ``on_error="raise"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from ..grids import N_LRS, N_XP, clean_flux_ivar
from ..schema import (
    LABELS,
    SHARD_SCHEMA,
    fixed_list,
    make_shard_table,
    rejects_table,
    validate_shard,
)

# An LRS spectrum needs at least this fraction of the 1462 canonical pixels with ivar > 0.
MIN_LRS_GOOD_FRACTION = 0.5

# Values beyond these are errors, not stars (a unit mix-up, an overflow, a fill value): such
# pixels are masked and such labels dropped, with a rejects row saying so. LRS flux is
# continuum-normalised (the strongest emission lines reach tens); XP flux is in W m^-2 nm^-1
# (the brightest stars in Gaia reach about 1e-10).
LRS_FLUX_LIMIT = 1e4
LRS_IVAR_LIMIT = 1e14
XP_FLUX_LIMIT = 1e-6
LABEL_RANGES = {
    "teff": (1000.0, 200_000.0),
    "logg": (-1.5, 10.0),
    "fe_h": (-6.0, 2.0),
    "alpha_m": (-1.5, 2.0),
}

# Internal provenance columns a reader adds with ``provenance=True`` (ingest strips them).
FILE_COLUMN = "_file"
ROW_COLUMN = "_row"
PROVENANCE_COLUMNS = (FILE_COLUMN, ROW_COLUMN)

_PARQUET_MAGIC = b"PAR1"
_LABEL_COLUMNS = tuple(name for label in LABELS for name in (label, f"{label}_err"))


def _is_parquet(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _PARQUET_MAGIC
    except OSError:
        return False


def looks_like_shards(path: str | os.PathLike) -> bool:
    """True for a Parquet file with a ``source_id`` column and at least one spectrum column
    (``lrs_flux``, ``lrs_ivar``, ``xp_flux``, ``xp_flux_error``), or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        return any(looks_like_shards(p) for p in sorted(path.rglob("*.parquet")))
    if not _is_parquet(path):
        return False
    try:
        names = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException):
        return False
    return "source_id" in names and bool(
        names & {"lrs_flux", "lrs_ivar", "xp_flux", "xp_flux_error"}
    )


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files of a shard source: the file itself, or a folder's ``*.parquet``, sorted."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
    return [path]


def read_shards(
    path: str | os.PathLike,
    release: str,
    batch_size: int = 4096,
    *,
    on_error: str = "reject",
    provenance: bool = False,
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Read canonical shards (a Parquet file or a folder of them) in batches.

    Yields ``(shards, rejects)`` per batch of at most ``batch_size`` input rows: ``shards``
    follows SHARD_SCHEMA (extra input columns carried after it), with ``release`` set to
    ``release``; ``rejects`` follows REJECTS_SCHEMA. With ``provenance=True`` the shards carry
    ``_file`` (str) and ``_row`` (int64, 0-based row in that file) for the ingest bookkeeping.
    ``on_error``: "reject" turns an unreadable file into a rejects row, "raise" into InputError.
    """
    if on_error not in ("reject", "raise"):
        raise ValueError(f"on_error must be 'reject' or 'raise', not {on_error!r}")
    for file in shard_files(path):
        row = 0
        try:
            if not looks_like_shards(file):
                raise InputError(
                    f"{file}: not a canonical shard (Parquet with source_id and spectra)"
                )
            parquet = pq.ParquetFile(file, pre_buffer=False)  # pre-buffering holds the whole file
            for batch in parquet.iter_batches(batch_size=batch_size):
                table = pa.Table.from_batches([batch])
                yield check_shard_rows(table, release, str(file), row, provenance=provenance)
                row += table.num_rows
        except (InputError, OSError, pa.ArrowException) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            if not message.startswith(str(file)):
                message = f"{file}: {message}"
            if on_error == "raise":
                raise InputError(message) from None
            where = f"unreadable from row {row}: " if row else ""
            reason = where + message.removeprefix(f"{file}: ")
            yield (
                SHARD_SCHEMA.empty_table(),
                rejects_table(
                    release, [{"file": str(file), "row": row if row else None, "reason": reason}]
                ),
            )


def array_column(
    table: pa.Table, name: str, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column as a dense matrix.

    Returns ``(values, present, length)``: values (n, width) float32 with NaN where the row is
    null or has the wrong length (null elements inside a list are NaN too), present (n,) bool
    (the row is not null), length (n,) int64 (-1 for a null row). A missing column is all null.
    """
    n = table.num_rows
    values = np.full((n, width), np.nan, dtype=np.float32)
    if name not in table.column_names:
        return values, np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64)
    col = table.column(name)
    col = col.combine_chunks() if col.num_chunks else pa.array([], type=col.type)
    try:
        col = col.cast(pa.large_list(pa.float32()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise InputError(f"column {name} ({col.type}) is not a list of numbers: {err}") from None
    present = col.is_valid().to_numpy(zero_copy_only=False)
    offsets = col.offsets.to_numpy()
    length = np.where(present, np.diff(offsets), -1).astype(np.int64)
    ok = present & (length == width)
    if ok.any():
        flat = col.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        values[ok] = flat[offsets[:-1][ok, None] + np.arange(width)]
    return values, present, length


def _number_column(table: pa.Table, name: str, dtype: type, fill: float | int) -> np.ndarray:
    """A scalar column as numpy with nulls (or an absent column) replaced by ``fill``."""
    if name not in table.column_names:
        return np.full(table.num_rows, fill, dtype=dtype)
    col = table.column(name)
    try:
        col = col.cast(pa.int64() if dtype is np.int64 else pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise InputError(f"column {name} ({col.type}) is not numeric: {err}") from None
    return col.fill_null(fill).to_numpy().astype(dtype)


def _modality_problems(
    flux_name: str,
    flux: tuple[np.ndarray, np.ndarray, np.ndarray],
    err_name: str,
    err: tuple[np.ndarray, np.ndarray, np.ndarray],
    width: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Shape checks shared by both modalities: (attempted (n,), reason (n,) object, '' = fine)."""
    (_, f_present, f_len), (_, e_present, e_len) = flux, err
    n = len(f_present)
    reason = np.full(n, "", dtype=object)
    for name, present, length in ((flux_name, f_present, f_len), (err_name, e_present, e_len)):
        wrong = present & (length != width) & (reason == "")
        reason[wrong] = [f"{name} has length {k}, expected {width}" for k in length[wrong]]
    lone_flux = f_present & ~e_present & (reason == "")
    reason[lone_flux] = f"{flux_name} without {err_name}"
    lone_err = e_present & ~f_present & (reason == "")
    reason[lone_err] = f"{err_name} without {flux_name}"
    return f_present | e_present, reason


def check_shard_rows(
    table: pa.Table,
    release: str,
    file: str,
    first_row: int = 0,
    *,
    provenance: bool = False,
) -> tuple[pa.Table, pa.Table]:
    """Check one batch of shard rows and return ``(shards, rejects)`` (see the module doc).

    Raises InputError (naming ``file``) when the columns themselves break the contract.
    """
    n = table.num_rows
    # column-level contract (required columns, fixed-size widths, castable types) on the schema
    # alone: row-level problems are handled below so that a bad row does not fail the file
    header = table.slice(0, 0)
    if "release" in header.column_names:
        header = header.drop_columns(["release"])
    header = header.append_column("release", pa.array([], type=pa.string()))
    try:
        validate_shard(header, where=file)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        raise InputError(f"{file}: {str(err).splitlines()[0]}") from None
    try:
        lrs_flux = array_column(table, "lrs_flux", N_LRS)
        lrs_ivar = array_column(table, "lrs_ivar", N_LRS)
        xp_flux = array_column(table, "xp_flux", N_XP)
        xp_error = array_column(table, "xp_flux_error", N_XP)
        obsid = _number_column(table, "obsid", np.int64, -1)
        labels = {name: _number_column(table, name, np.float64, np.nan) for name in _LABEL_COLUMNS}
    except InputError as err:
        raise InputError(f"{file}: {err}") from None
    sid_col = table.column("source_id")
    sid_valid = sid_col.is_valid().to_numpy(zero_copy_only=False)
    source_id = _number_column(table, "source_id", np.int64, 0)

    # --- LRS: shape, then pixel quality
    lrs_tried, lrs_reason = _modality_problems("lrs_flux", lrs_flux, "lrs_ivar", lrs_ivar, N_LRS)
    flux, ivar = clean_flux_ivar(lrs_flux[0], lrs_ivar[0])
    good_fraction = (ivar > 0).mean(axis=1) if n else np.zeros(0)
    low = lrs_tried & (lrs_reason == "") & (good_fraction < MIN_LRS_GOOD_FRACTION)
    nonfinite = (~np.isfinite(lrs_flux[0])).sum(axis=1)
    lrs_reason[low] = [
        f"lrs: only {100 * g:.0f}% good pixels ({k} NaN/inf flux), needs >= "
        f"{100 * MIN_LRS_GOOD_FRACTION:.0f}%"
        for g, k in zip(good_fraction[low], nonfinite[low], strict=True)
    ]
    keep_lrs = lrs_tried & (lrs_reason == "")

    # --- XP: shape, then every pixel must be usable
    xp_tried, xp_reason = _modality_problems("xp_flux", xp_flux, "xp_flux_error", xp_error, N_XP)
    bad_pixels = (~np.isfinite(xp_flux[0]) | ~np.isfinite(xp_error[0]) | ~(xp_error[0] > 0)).sum(
        axis=1
    )
    unusable = xp_tried & (xp_reason == "") & (bad_pixels > 0)
    xp_reason[unusable] = [
        f"xp: {k} pixels with non-finite flux or non-positive error" for k in bad_pixels[unusable]
    ]
    keep_xp = xp_tried & (xp_reason == "")

    keep = sid_valid & (keep_lrs | keep_xp)
    reason = np.full(n, "", dtype=object)
    for tried, why, name in ((lrs_tried, lrs_reason, "LRS"), (xp_tried, xp_reason, "XP")):
        dropped = tried & (why != "")
        suffix = np.where(keep[dropped], f" ({name} dropped, row kept)", "")
        reason[dropped] = [
            f"{r}; {w}{s}" if r else f"{w}{s}"
            for r, w, s in zip(reason[dropped], why[dropped], suffix, strict=True)
        ]
    reason[~(lrs_tried | xp_tried)] = "no LRS or XP spectrum"
    reason[~sid_valid] = "source_id is null"
    bad_rows = np.flatnonzero(reason != "")
    rejects = rejects_table(
        release,
        [
            {
                "file": file,
                "row": first_row + int(i),
                "source_id": int(source_id[i]) if sid_valid[i] else None,
                "obsid": int(obsid[i]) if obsid[i] >= 0 else None,
                "reason": reason[i],
            }
            for i in bad_rows
        ],
    )

    def kept(values: np.ndarray, modality: np.ndarray) -> np.ndarray:
        return np.where(modality[:, None], values, np.nan)[keep]

    shards = make_shard_table(
        source_id[keep],
        release,
        obsid=obsid[keep],
        lrs_flux=kept(flux.astype(np.float32), keep_lrs),
        lrs_ivar=kept(ivar.astype(np.float32), keep_lrs),
        xp_flux=kept(xp_flux[0], keep_xp),
        xp_flux_error=kept(xp_error[0], keep_xp),
        labels={name: values[keep] for name, values in labels.items()},
    )
    mask = pa.array(keep)
    for name in table.column_names:
        if name not in SHARD_SCHEMA.names and name not in PROVENANCE_COLUMNS:
            shards = shards.append_column(table.schema.field(name), table.column(name).filter(mask))
    if provenance:
        rows = first_row + np.flatnonzero(keep)
        shards = shards.append_column(FILE_COLUMN, pa.array([file] * len(rows), type=pa.string()))
        shards = shards.append_column(ROW_COLUMN, pa.array(rows, type=pa.int64()))
    return shards, rejects


def _explain(reasons: list[list[str]], rows: np.ndarray, text) -> None:
    """Add ``text(i)`` to the reasons of every row ``i`` where ``rows`` is true."""
    for i in np.flatnonzero(rows):
        reasons[i].append(text(i))


def screen_implausible(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """Mask what no star can show, in conformed reader rows (SHARD_SCHEMA plus provenance).

    LRS pixels beyond LRS_FLUX_LIMIT (or with ivar beyond LRS_IVAR_LIMIT) get ivar 0 and flux 0,
    and the LRS is dropped when fewer than MIN_LRS_GOOD_FRACTION of its pixels stay good; an XP
    spectrum with any pixel beyond XP_FLUX_LIMIT is dropped; a label outside LABEL_RANGES (or
    with a negative or non-finite error) is dropped with its error. A row left without a
    spectrum is removed. Returns (table, rejects records naming file, row and reason); the
    table is returned untouched when nothing is implausible.
    """
    n = table.num_rows
    if n == 0:
        return table, []
    reasons: list[list[str]] = [[] for _ in range(n)]
    columns: dict[str, pa.Array] = {}

    def matrix(name: str) -> np.ndarray:
        return array_column(table, name, N_LRS if name.startswith("lrs") else N_XP)[0]

    lrs_flux, lrs_ivar = matrix("lrs_flux"), matrix("lrs_ivar")
    with np.errstate(invalid="ignore"):
        wild = (np.abs(lrs_flux) > LRS_FLUX_LIMIT) | (lrs_ivar > LRS_IVAR_LIMIT)
    lrs_drop = np.zeros(n, dtype=bool)
    if wild.any():
        has = table.column("lrs_flux").is_valid().to_numpy(zero_copy_only=False)
        counts = wild.sum(axis=1)
        lrs_flux[wild], lrs_ivar[wild] = 0.0, 0.0
        good = (np.nan_to_num(lrs_ivar) > 0).mean(axis=1)
        lrs_drop = has & (counts > 0) & (good < MIN_LRS_GOOD_FRACTION)
        _explain(
            reasons,
            counts > 0,
            lambda i: (
                f"lrs: {counts[i]} pixels beyond any plausible flux (|flux| > "
                f"{LRS_FLUX_LIMIT:g} or ivar > {LRS_IVAR_LIMIT:g}) "
                f"({'LRS dropped' if lrs_drop[i] else 'pixels masked'}"
            ),
        )
        lrs_flux[lrs_drop], lrs_ivar[lrs_drop] = np.nan, np.nan
        columns["lrs_flux"] = fixed_list(lrs_flux, N_LRS, n)
        columns["lrs_ivar"] = fixed_list(lrs_ivar, N_LRS, n)
    xp_flux, xp_error = matrix("xp_flux"), matrix("xp_flux_error")
    with np.errstate(invalid="ignore"):
        xp_wild = ((np.abs(xp_flux) > XP_FLUX_LIMIT) | (xp_error > XP_FLUX_LIMIT)).sum(axis=1)
    xp_drop = xp_wild > 0
    if xp_drop.any():
        _explain(
            reasons,
            xp_drop,
            lambda i: (
                f"xp: {xp_wild[i]} pixels beyond any plausible flux (|flux| or error > "
                f"{XP_FLUX_LIMIT:g} W m^-2 nm^-1) (XP dropped"
            ),
        )
        xp_flux[xp_drop], xp_error[xp_drop] = np.nan, np.nan
        columns["xp_flux"] = fixed_list(xp_flux, N_XP, n)
        columns["xp_flux_error"] = fixed_list(xp_error, N_XP, n)
    for label, (low, high) in LABEL_RANGES.items():
        if label not in table.column_names:
            continue
        value = _number_column(table, label, np.float64, np.nan)
        error = _number_column(table, f"{label}_err", np.float64, np.nan)
        given = ~np.isnan(value)
        with np.errstate(invalid="ignore"):
            bad = given & (~np.isfinite(value) | (value < low) | (value > high))
            bad |= given & ~np.isnan(error) & ~(np.isfinite(error) & (error >= 0))
        if bad.any():
            _explain(
                reasons,
                bad,
                lambda i, label=label, low=low, high=high, value=value, error=error: (
                    f"{label} {value[i]:g} +- {error[i]:g} outside the physical range "
                    f"[{low:g}, {high:g}] (label dropped"
                ),
            )
            for name, values in ((label, value), (f"{label}_err", error)):
                columns[name] = pa.array(
                    values.astype(np.float32), pa.float32(), mask=bad | np.isnan(values)
                )
    if not columns:
        return table, []
    for name, array in columns.items():
        table = table.set_column(
            table.schema.get_field_index(name), table.schema.field(name), array
        )
    empty = ~table.column("lrs_flux").is_valid().to_numpy(zero_copy_only=False) & ~table.column(
        "xp_flux"
    ).is_valid().to_numpy(zero_copy_only=False)
    files = table.column(FILE_COLUMN).to_pylist() if FILE_COLUMN in table.column_names else None
    rows = table.column(ROW_COLUMN).to_pylist() if ROW_COLUMN in table.column_names else None
    ids = table.column("source_id").to_pylist()
    obsids = table.column("obsid").to_pylist() if "obsid" in table.column_names else None
    records = [
        {
            "file": files[i] if files else None,
            "row": rows[i] if rows else None,
            "source_id": ids[i],
            "obsid": obsids[i] if obsids else None,
            "reason": "; ".join(
                f"{r}{', row rejected)' if empty[i] else ', row kept)'}" for r in reasons[i]
            ),
        }
        for i in range(n)
        if reasons[i]
    ]
    if empty.any():
        table = table.filter(pa.array(~empty))
    return table, records
