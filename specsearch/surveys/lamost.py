"""LAMOST low-resolution spectra (LRS): FITS reader for both archive layouts.

Layouts
-------
- **image** (older releases): the primary HDU is a 2-D image whose rows are flux, ivar,
  wavelength, andmask, ormask. The wavelength comes from the header, log10(lambda/A) =
  COEFF0 + COEFF1 * i (CRVAL1/CD1_1 with DC-FLAG = 1 are accepted too); without those keys the
  third row is used when it is an increasing wavelength array (then andmask is row 4, else row 3).
- **table** (newer releases): a binary-table HDU (EXTNAME COADD, or the first table with a FLUX
  column) with one row of array columns FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK.

Header keys read (primary header first, then the table's): OBSID; the designation (DESIGNAT,
DESIG or DESIGNATION, carried as the extra string column ``designation``); the Gaia DR3 id
(GAIA_SOURCE_ID, GAIA_SOURCEID, GAIA_DR3_SOURCE_ID, GAIA_DR3_ID, GAIADR3_ID, GAIA_ID, GAIAID,
SOURCE_ID; the first positive integer wins).

Processing, batched over ``batch_size`` files: pixels with ANDMASK != 0, NaN/inf flux, or
negative/non-finite ivar get ivar 0; then ``grids.canonical_lrs``, the one LRS path that the
simulator's shards take too: resampled (ivar propagated) onto the fitting grid, the continuum
fitted and divided out, the canonical grid cut out.

Missing Gaia id
---------------
``source_id`` is the cross-modal join key and cannot be null, so a spectrum whose header has no
Gaia id gets the pseudo id ``source_id = -obsid``: negative, so it never collides with a real
Gaia DR3 source_id (all positive) and never pairs with an XP spectrum, and the star stays
findable by obsid. A spectrum with neither id is rejected.

Rejects (one rejects row per file, or InputError with ``on_error="raise"``)
-----------------------------------------------------------------------------
"corrupt or truncated FITS: ...", "no LRS spectrum (...)", "missing column ...", "arrays of
different lengths ...", "wavelength is not finite and increasing", "wavelength ... covers N% of the
LRS grid ..., needs >= 90%", "only N% of the LRS grid has good pixels (...), needs >= 50%",
"no Gaia source_id and no OBSID in the header".
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from astropy.io import fits

from ..errors import InputError
from ..files import atomic_path
from ..grids import LRS_WAVELENGTH, MIN_LRS_COVERAGE, canonical_lrs, lrs_coverage
from ..pool import parallel_map
from ..schema import SHARD_SCHEMA, make_shard_table, rejects_table
from .shards import FILE_COLUMN, MIN_LRS_GOOD_FRACTION, ROW_COLUMN

OBSID_KEYS = ("OBSID",)
DESIGNATION_KEYS = ("DESIGNAT", "DESIG", "DESIGNATION")
GAIA_ID_KEYS = (
    "GAIA_SOURCE_ID",
    "GAIA_SOURCEID",
    "GAIA_DR3_SOURCE_ID",
    "GAIA_DR3_ID",
    "GAIADR3_ID",
    "GAIA_ID",
    "GAIAID",
    "SOURCE_ID",
)
# primary-header keys that mark a FITS file as LAMOST LRS
_LAMOST_MARKERS = ("COEFF0", "OBSID", "DESIG", "DESIGNAT")
_FITS_BLOCK = 2880
_CARD = 80


class _Unusable(Exception):
    """A LAMOST file that cannot become a canonical row; the message is the reject reason."""

    def __init__(self, reason: str, obsid: int | None = None, source_id: int | None = None):
        super().__init__(reason)
        self.obsid = obsid
        self.source_id = source_id


@dataclass
class LamostSpectrum:
    """One LAMOST LRS spectrum as stored in the file (native pixels, m of them).

    wavelength: (m,) Angstrom (vacuum); flux: (m,) LAMOST flux units; ivar: (m,) 1/flux^2;
    andmask: (m,) int, 0 = good. ``source_id`` is the Gaia DR3 id or None, ``obsid`` None if absent.
    """

    file: str
    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    andmask: np.ndarray
    obsid: int | None
    source_id: int | None
    designation: str | None
    layout: str


# ------------------------------------------------------------------ detection


def _mask_bits(andmask: np.ndarray) -> np.ndarray:
    """AND-mask bits as integers; a value that is no integer (NaN, inf, out of range) counts
    as a set bit (the pixel is masked)."""
    values = np.asarray(andmask, dtype=np.float64)
    bad = ~np.isfinite(values) | (np.abs(values) > 2**62)
    return np.where(bad, 1.0, values).astype(np.int64)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as raw:
        return raw.read(2) == b"\x1f\x8b"


def _read_head(path: Path, max_blocks: int = 36) -> bytes:
    """The first header blocks of a (possibly gzipped) file, up to and including the END card."""
    opener = gzip.open if _is_gzip(path) else open
    head = b""
    with opener(path, "rb") as f:
        for _ in range(max_blocks):
            block = f.read(_FITS_BLOCK)
            head += block
            if len(block) < _FITS_BLOCK or _has_end_card(block):
                break
    return head


def _has_end_card(block: bytes) -> bool:
    return any(block[i : i + _CARD].rstrip() == b"END" for i in range(0, len(block), _CARD))


def _header_keys(head: bytes) -> dict[str, str]:
    cards = {}
    for i in range(0, len(head) - _CARD + 1, _CARD):
        card = head[i : i + _CARD].decode("ascii", errors="replace")
        key = card[:8].strip()
        if key == "END":
            break
        if card[8:10] == "= ":
            cards[key] = card[10:].split("/")[0].strip().strip("'").strip()
    return cards


def looks_like_lamost_fits(path: str | os.PathLike) -> bool:
    """True when ``path`` is a FITS file (plain or gzipped) whose primary header is LAMOST's:
    TELESCOP = 'LAMOST' or one of COEFF0, OBSID, DESIG/DESIGNAT. Reads only the header, so a
    LAMOST file with truncated data is still recognised (and then rejected by ``read_lamost``)."""
    try:
        head = _read_head(Path(path))
    except (OSError, EOFError, gzip.BadGzipFile):
        return False
    if not head.startswith(b"SIMPLE  ="):
        return False
    keys = _header_keys(head)
    return keys.get("TELESCOP", "").upper() == "LAMOST" or any(k in keys for k in _LAMOST_MARKERS)


# ------------------------------------------------------------------ reading one file


def _positive_int(value: Any) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    elif (
        isinstance(value, (float, np.floating)) and float(value).is_integer() and abs(value) < 2**53
    ):
        number = int(value)
    else:
        return None
    return number if 0 < number < 2**63 else None


def _first(headers: list[fits.Header], keys: Iterable[str], convert) -> Any:
    for header in headers:
        for key in keys:
            if key in header:
                value = convert(header[key])
                if value is not None:
                    return value
    return None


def _designation(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _log_linear_wavelength(headers: list[fits.Header], n_pixels: int) -> np.ndarray | None:
    """Wavelength (Angstrom) from COEFF0/COEFF1, or CRVAL1/CD1_1 with DC-FLAG = 1."""
    for header in headers:
        if "COEFF0" in header and "COEFF1" in header:
            start, step = float(header["COEFF0"]), float(header["COEFF1"])
        elif "CRVAL1" in header and "CD1_1" in header and int(header.get("DC-FLAG", 0)) == 1:
            start, step = float(header["CRVAL1"]), float(header["CD1_1"])
        else:
            continue
        return 10.0 ** (start + step * np.arange(n_pixels))
    return None


def _looks_like_wavelength(row: np.ndarray) -> bool:
    return bool(
        np.all(np.isfinite(row))
        and np.all(np.diff(row) > 0)
        and 1000.0 < row[0]
        and row[-1] < 30000.0
    )


def _from_image(data: np.ndarray, headers: list[fits.Header]) -> tuple[np.ndarray, ...]:
    if data.ndim != 2 or data.shape[0] < 2:
        raise _Unusable(
            f"no LRS spectrum (primary image of shape {data.shape}, expected rows flux, ivar, ...)"
        )
    data = data.astype(np.float64)
    n_rows, n_pixels = data.shape
    has_wave_row = n_rows >= 3 and _looks_like_wavelength(data[2])
    wavelength = _log_linear_wavelength(headers, n_pixels)
    if wavelength is None:
        if not has_wave_row:
            raise _Unusable("no wavelength: no COEFF0/COEFF1 header keys and no wavelength row")
        wavelength = data[2]
    mask_row = 3 if has_wave_row else 2
    andmask = data[mask_row] if n_rows > mask_row else np.zeros(n_pixels)
    return wavelength, data[0], data[1], andmask


def _from_table(hdu: fits.BinTableHDU, headers: list[fits.Header]) -> tuple[np.ndarray, ...]:
    names = {name.upper(): name for name in hdu.columns.names}
    for required in ("FLUX", "IVAR"):
        if required not in names:
            raise _Unusable(f"missing column {required} in HDU {hdu.name or 1}")
    if hdu.data is None or len(hdu.data) < 1:
        raise _Unusable(f"HDU {hdu.name or 1} has no rows")
    row = hdu.data[0]

    def column(name: str) -> np.ndarray:
        return np.asarray(row[names[name]], dtype=np.float64).ravel()

    flux, ivar = column("FLUX"), column("IVAR")
    if "WAVELENGTH" in names:
        wavelength = column("WAVELENGTH")
    else:
        wavelength = _log_linear_wavelength(headers, len(flux))
        if wavelength is None:
            raise _Unusable("missing column WAVELENGTH and no COEFF0/COEFF1 header keys")
    andmask = column("ANDMASK") if "ANDMASK" in names else np.zeros(len(flux))
    return wavelength, flux, ivar, andmask


def _spectrum_table(hdul: fits.HDUList) -> fits.BinTableHDU | None:
    tables = [
        h
        for h in hdul[1:]
        if isinstance(h, fits.BinTableHDU) and "FLUX" in {c.upper() for c in h.columns.names}
    ]
    named = [h for h in tables if h.name.upper() == "COADD"]
    return (named or tables or [None])[0]


def read_lamost_file(path: str | os.PathLike) -> LamostSpectrum:
    """Read one LAMOST LRS FITS file (either layout) without resampling.

    Raises InputError (one line naming the file) for an unreadable, truncated or non-LRS file.
    """
    try:
        return _read_lamost_file(Path(path))
    except _Unusable as err:
        raise InputError(f"{path}: {err}") from None


def _file_bytes(path: Path) -> bytes:
    """The whole FITS file, decompressed when gzipped (LAMOST files are ~100 kB)."""
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as f:
        return f.read()


def _check_complete(
    size: int, hdul: fits.HDUList, obsid: int | None, source_id: int | None
) -> None:
    """Compare the file size (bytes, decompressed) with the data its headers announce."""
    needed = max(hdul.fileinfo(i)["datLoc"] + hdu.size for i, hdu in enumerate(hdul))
    if needed > size:
        raise _Unusable(
            f"truncated FITS: the file has {size} bytes, its headers announce {needed}",
            obsid,
            source_id,
        )


def _read_lamost_file(path: Path) -> LamostSpectrum:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = _file_bytes(path)
            with fits.open(io.BytesIO(data), memmap=False) as hdul:
                headers = [hdul[0].header]
                obsid = _first(headers, OBSID_KEYS, _positive_int)
                source_id = _first(headers, GAIA_ID_KEYS, _positive_int)
                _check_complete(len(data), hdul, obsid, source_id)
                table = _spectrum_table(hdul)
                image = hdul[0].data
                if image is not None and np.ndim(image) == 2:
                    layout = "image"
                    arrays = _from_image(np.asarray(image), headers)
                elif table is not None:
                    layout = "table"
                    headers.append(table.header)
                    arrays = _from_table(table, headers)
                else:
                    raise _Unusable("no LRS spectrum (no 2-D primary image and no table with FLUX)")
                obsid = obsid or _first(headers, OBSID_KEYS, _positive_int)
                source_id = source_id or _first(headers, GAIA_ID_KEYS, _positive_int)
                designation = _first(headers, DESIGNATION_KEYS, _designation)
        truncated = [w for w in caught if "truncat" in str(w.message).lower()]
        if truncated:
            raise _Unusable(
                f"corrupt or truncated FITS: {str(truncated[0].message).splitlines()[0]}"
            )
    except _Unusable:
        raise
    except FileNotFoundError:
        raise _Unusable("no such file") from None
    except (OSError, ValueError, TypeError, IndexError, KeyError, EOFError, zlib.error) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _Unusable(f"corrupt or truncated FITS: {message}") from None
    wavelength, flux, ivar, andmask = arrays
    lengths = {
        "wavelength": len(wavelength),
        "flux": len(flux),
        "ivar": len(ivar),
        "andmask": len(andmask),
    }
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k} {v}" for k, v in lengths.items())
        raise _Unusable(f"arrays of different lengths ({detail})", obsid, source_id)
    return LamostSpectrum(
        file=str(path),
        wavelength=wavelength,
        flux=flux,
        ivar=ivar,
        andmask=_mask_bits(andmask),
        obsid=obsid,
        source_id=source_id,
        designation=designation,
        layout=layout,
    )


def _check(spectrum: LamostSpectrum) -> None:
    """Per-file checks before resampling; raises _Unusable with the reject reason."""
    ids = {"obsid": spectrum.obsid, "source_id": spectrum.source_id}
    if spectrum.source_id is None and spectrum.obsid is None:
        raise _Unusable("no Gaia source_id and no OBSID in the header")
    wave = spectrum.wavelength
    if len(wave) < 2 or not (
        np.all(np.isfinite(wave)) and np.all(np.diff(wave) > 0) and wave[0] > 0
    ):
        raise _Unusable("wavelength is not finite and increasing", **ids)
    coverage = float(lrs_coverage(wave[0], wave[-1]))
    if coverage < MIN_LRS_COVERAGE:
        raise _Unusable(
            f"wavelength {wave[0]:.1f}-{wave[-1]:.1f} A covers {100 * coverage:.0f}% of the LRS grid "
            f"{LRS_WAVELENGTH[0]:.1f}-{LRS_WAVELENGTH[-1]:.1f} A, needs >= {100 * MIN_LRS_COVERAGE:.0f}%",
            **ids,
        )


# ------------------------------------------------------------------ batches


def _stack(spectra: list[LamostSpectrum]) -> tuple[np.ndarray, ...]:
    """Pad native spectra to one (n, m) batch: wavelength repeats its last value, ivar 0 there.

    Returns wavelength (n, m) A, flux (n, m), ivar (n, m) with masked pixels at 0, and per-file
    counts (n,) of NaN/inf flux, bad ivar and ANDMASK pixels.
    """
    n, m = len(spectra), max(len(s.flux) for s in spectra)
    length = np.array([len(s.flux) for s in spectra])
    valid = np.arange(m)[None, :] < length[:, None]
    wavelength = np.zeros((n, m))
    flux, ivar = np.zeros((n, m)), np.zeros((n, m))
    andmask = np.zeros((n, m), dtype=np.int64)
    for k, s in enumerate(spectra):  # one copy per file; the pixel work below is vectorised
        wavelength[k, : length[k]] = s.wavelength
        flux[k, : length[k]], ivar[k, : length[k]], andmask[k, : length[k]] = (
            s.flux,
            s.ivar,
            s.andmask,
        )
    last = wavelength[np.arange(n), length - 1]
    wavelength = np.where(valid, wavelength, last[:, None])
    nonfinite = (valid & ~np.isfinite(flux)).sum(axis=1)
    bad_ivar = (valid & ~(np.isfinite(ivar) & (ivar >= 0))).sum(axis=1)
    masked = (valid & (andmask != 0)).sum(axis=1)
    ivar = np.where(valid & (andmask == 0), ivar, 0.0)
    return wavelength, flux, ivar, nonfinite, bad_ivar, masked


def lamost_batch(
    spectra: list[LamostSpectrum], release: str, *, provenance: bool = False
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Resample and normalise a batch of native spectra (`grids.canonical_lrs`, one call).

    Returns the canonical shards (extra column ``designation``; ``_file``/``_row`` with
    ``provenance``) and reject records for spectra with too few good pixels.
    """
    records: list[dict[str, Any]] = []
    if not spectra:
        return _empty(provenance), records
    wavelength, flux, ivar, nonfinite, bad_ivar, masked = _stack(spectra)
    norm_flux, norm_ivar = canonical_lrs(wavelength, flux, ivar)
    good_fraction = (norm_ivar > 0).mean(axis=1)
    ok = good_fraction >= MIN_LRS_GOOD_FRACTION
    for k in np.flatnonzero(~ok):
        s = spectra[k]
        records.append(
            {
                "file": s.file,
                "source_id": _pseudo_source_id(s),
                "obsid": s.obsid,
                "reason": f"only {100 * good_fraction[k]:.0f}% of the LRS grid has good pixels "
                f"({nonfinite[k]} NaN/inf flux, {bad_ivar[k]} negative or non-finite ivar, "
                f"{masked[k]} ANDMASK pixels), needs >= {100 * MIN_LRS_GOOD_FRACTION:.0f}%",
            }
        )
    kept = [s for s, keep in zip(spectra, ok, strict=True) if keep]
    if not kept:
        return _empty(provenance), records
    table = make_shard_table(
        np.array([_pseudo_source_id(s) for s in kept], dtype=np.int64),
        release,
        obsid=np.array([s.obsid if s.obsid is not None else -1 for s in kept], dtype=np.int64),
        lrs_flux=norm_flux[ok],
        lrs_ivar=norm_ivar[ok],
    )
    table = table.append_column(
        pa.field("designation", pa.string()),
        pa.array([s.designation for s in kept], type=pa.string()),
    )
    if provenance:
        table = _with_provenance(table, [s.file for s in kept])
    return table, records


def _pseudo_source_id(spectrum: LamostSpectrum) -> int | None:
    if spectrum.source_id is not None:
        return spectrum.source_id
    return -spectrum.obsid if spectrum.obsid is not None else None


def _with_provenance(table: pa.Table, files: list[str]) -> pa.Table:
    table = table.append_column(FILE_COLUMN, pa.array(files, type=pa.string()))
    return table.append_column(ROW_COLUMN, pa.nulls(len(files), type=pa.int64()))


def _empty(provenance: bool) -> pa.Table:
    table = SHARD_SCHEMA.empty_table().append_column(
        pa.field("designation", pa.string()), pa.array([], type=pa.string())
    )
    return _with_provenance(table, []) if provenance else table


def read_lamost(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    release: str,
    batch_size: int = 256,
    *,
    on_error: str = "reject",
    provenance: bool = False,
    workers: int = 1,
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Read LAMOST LRS FITS files onto the canonical grid, ``batch_size`` files at a time.

    paths: one file, or many (a folder is not expanded here: ``ingest`` finds the files).
    Yields ``(shards, rejects)`` per batch: ``shards`` follows SHARD_SCHEMA plus the extra
    string column ``designation`` (and ``_file``/``_row`` with ``provenance=True``); every file
    that cannot be used is one rejects row with its reason (see the module doc).
    on_error: "reject" (default) as above, or "raise": the first unusable file raises
    InputError, one line naming the file and the reason.
    workers: processes that read whole batches (one per core scales the reading of a survey);
    with a single batch it is read in this process. The output does not depend on it.
    """
    if on_error not in ("reject", "raise"):
        raise ValueError(f"on_error must be 'reject' or 'raise', not {on_error!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    job = functools.partial(_read_batch, release=release, provenance=provenance, on_error=on_error)
    # whole batches to worker processes: parsing, resampling, continuum
    with parallel_map(job, batches, workers) as results:
        for table, rejects, error in results:
            if error is not None:
                raise InputError(error)
            yield table, rejects


def _read_batch(
    paths: list[Path], release: str, provenance: bool, on_error: str
) -> tuple[pa.Table | None, pa.Table | None, str | None]:
    """One batch of files -> (shards, rejects, None), or (None, None, the one-line error) for
    the first unusable file when on_error is "raise". Runs in a worker process when asked."""
    spectra: list[LamostSpectrum] = []
    records: list[Mapping[str, Any]] = []
    for path in paths:
        try:
            spectrum = _read_lamost_file(path)
            _check(spectrum)
            spectra.append(spectrum)
        except _Unusable as err:
            if on_error == "raise":
                return None, None, f"{path}: {err}"
            pseudo = -err.obsid if err.obsid is not None else None
            records.append(
                {
                    "file": str(path),
                    "source_id": err.source_id if err.source_id is not None else pseudo,
                    "obsid": err.obsid,
                    "reason": str(err),
                }
            )
    table, low_quality = lamost_batch(spectra, release, provenance=provenance)
    if low_quality and on_error == "raise":
        return None, None, f"{low_quality[0]['file']}: {low_quality[0]['reason']}"
    return table, rejects_table(release, [*records, *low_quality]), None


# ------------------------------------------------------------------ writing (simulator, tests)


def write_lamost_fits(
    path: str | os.PathLike,
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    layout: str = "image",
    header: Mapping[str, Any] | None = None,
    andmask: np.ndarray | None = None,
    ormask: np.ndarray | None = None,
    wavelength_in_header: bool = True,
) -> Path:
    """Write one LAMOST-like LRS FITS file (the simulator's `--as-files`, tests, examples).

    wavelength (m,) Angstrom increasing; flux, ivar (m,); andmask/ormask (m,) int (default 0).
    layout "image": primary image with rows flux, ivar, wavelength, andmask, ormask (float32)
    and, when the wavelength is log-linear and ``wavelength_in_header``, COEFF0/COEFF1 in the
    header. layout "table": header keys in the primary HDU, one-row binary table EXTNAME COADD.
    ``header``: extra primary-header keys (OBSID, DESIGNAT, GAIA_SOURCE_ID, ...; COEFF0/COEFF1
    given here are written as given); TELESCOP = 'LAMOST' is always written. Atomic.
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float32)
    ivar = np.asarray(ivar, dtype=np.float32)
    m = len(wavelength)
    andmask = (
        np.zeros(m, dtype=np.int32) if andmask is None else np.asarray(andmask, dtype=np.int32)
    )
    ormask = np.zeros(m, dtype=np.int32) if ormask is None else np.asarray(ormask, dtype=np.int32)
    primary = fits.PrimaryHDU()
    primary.header["TELESCOP"] = "LAMOST"
    for key, value in (header or {}).items():
        # keys longer than 8 characters (GAIA_SOURCE_ID) are HIERARCH cards, as archives write them
        primary.header[key if len(key) <= 8 else f"HIERARCH {key}"] = value
    if layout == "image":
        primary.data = np.stack([flux, ivar, wavelength, andmask, ormask]).astype(np.float32)
        loglam = np.log10(wavelength)
        step = (loglam[-1] - loglam[0]) / (m - 1)
        given = "COEFF0" in primary.header  # the caller's exact grid keys win
        if (
            wavelength_in_header
            and not given
            and np.allclose(np.diff(loglam), step, rtol=0, atol=1e-9)
        ):
            primary.header["COEFF0"] = float(loglam[0])
            primary.header["COEFF1"] = float(step)
        hdul = fits.HDUList([primary])
    elif layout == "table":
        columns = [
            fits.Column(name="FLUX", format=f"{m}E", array=flux[None, :]),
            fits.Column(name="IVAR", format=f"{m}E", array=ivar[None, :]),
            fits.Column(name="WAVELENGTH", format=f"{m}D", array=wavelength[None, :]),
            fits.Column(name="ANDMASK", format=f"{m}J", array=andmask[None, :]),
            fits.Column(name="ORMASK", format=f"{m}J", array=ormask[None, :]),
        ]
        table = fits.BinTableHDU.from_columns(columns, name="COADD")
        hdul = fits.HDUList([primary, table])
    else:
        raise ValueError(f"layout must be 'image' or 'table', not {layout!r}")
    path = Path(path)
    with atomic_path(path) as tmp:
        hdul.writeto(tmp, overwrite=True)
    return path
