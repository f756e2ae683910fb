"""The one place that defines specsearch's tables: every schema the store holds (canonical
shards, rejects, embeddings, scores, neighbours) and the simulator's truth, plus the names they
share (modalities, labels, release names)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import InputError, SpecsearchError
from .grids import N_LRS, N_XP

MODALITIES = ("lrs", "xp")
"""LAMOST low-resolution spectra and Gaia XP spectra."""

LABELS = ("teff", "logg", "fe_h", "alpha_m")
LABEL_UNITS = {"teff": "K", "logg": "dex", "fe_h": "dex", "alpha_m": "dex"}

_RELEASE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_release(release: str) -> str:
    """A release name is used as a partition directory: letters, digits, '_', '.', '-' only."""
    if not release or not _RELEASE_RE.match(release):
        raise SpecsearchError(f"release name {release!r} must be letters, digits, '_', '.' or '-'")
    return release


def check_modality(modality: str, option: str = "modality") -> str:
    """``modality`` if it is one of MODALITIES, else a one-line error naming ``--option``."""
    if modality not in MODALITIES:
        raise SpecsearchError(f"--{option} must be lrs or xp, not {modality!r}")
    return modality


LRS_ARRAY = pa.list_(pa.float32(), N_LRS)
XP_ARRAY = pa.list_(pa.float32(), N_XP)

SHARD_SCHEMA = pa.schema(
    [
        pa.field("source_id", pa.int64(), nullable=False),
        pa.field("obsid", pa.int64()),
        pa.field("release", pa.string(), nullable=False),
        pa.field("lrs_flux", LRS_ARRAY),
        pa.field("lrs_ivar", LRS_ARRAY),
        pa.field("xp_flux", XP_ARRAY),
        pa.field("xp_flux_error", XP_ARRAY),
    ]
    + [pa.field(name, pa.float32()) for label in LABELS for name in (label, f"{label}_err")]
)
ARRAY_COLUMNS = ("lrs_flux", "lrs_ivar", "xp_flux", "xp_flux_error")

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("release", pa.string()),
        pa.field("file", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("source_id", pa.int64()),
        pa.field("obsid", pa.int64()),
        pa.field("reason", pa.string()),
    ]
)


def rejects_table(release: str, records: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build a REJECTS_SCHEMA table from dicts with keys file, row, source_id, obsid, reason.

    Missing keys are null; ``release`` is filled in for every row.
    """
    rows = [
        {
            "release": release,
            "file": r.get("file"),
            "row": r.get("row"),
            "source_id": r.get("source_id"),
            "obsid": r.get("obsid"),
            "reason": r["reason"],
        }
        for r in records
    ]
    return (
        pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA) if rows else REJECTS_SCHEMA.empty_table()
    )


def embedding_schema(dim: int, feature_dim: int | None = None) -> pa.Schema:
    """Schema of the embedding files: one row per star and modality (the release is the
    folder the file lies in). ``features``: the model heads' whole output (float16, which moves
    decoded spectra by under 0.002 sigma), from which the score stage decodes the predicted
    spectra without running the encoders again."""
    fields = [
        pa.field("source_id", pa.int64(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float16(), dim)),  # L2-normalised
        pa.field("features", pa.list_(pa.float16(), feature_dim or dim)),
        pa.field("recon_chi2", pa.float32()),  # observed vs in-modal reconstruction
        pa.field("cross_chi2", pa.float32()),  # observed vs prediction from the other modality
        pa.field("n_good_pixels", pa.int32()),
        pa.field("align_cos", pa.float32()),  # cos(z_lrs, z_xp) of the same star, where both exist
    ]
    for label in LABELS:
        fields += [
            pa.field(f"pred_{label}", pa.float32()),
            pa.field(f"pred_{label}_err", pa.float32()),
        ]
    return pa.schema(fields)


NEIGHBORS_SCHEMA = pa.schema(
    [
        pa.field("source_id", pa.int64(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),  # the query's and the neighbours'
        pa.field("rank", pa.int32(), nullable=False),  # 1 = nearest
        pa.field("neighbor_id", pa.int64(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),  # cosine
        pa.field("release", pa.string(), nullable=False),  # the release that was scored
    ]
)
"""The kNN graph the score stage writes: each star's nearest other stars in one modality."""

SCORE_COMPONENTS = (
    "recon_lrs",
    "cross_lrs",
    "knn_lrs",
    "bad_lrs",
    "recon_xp",
    "cross_xp",
    "knn_xp",
    "knn_pair",
    "align",
    "labels",
)
"""The anomaly components (``specsearch.pipeline.score`` defines them)."""

SCORES_SCHEMA = pa.schema(
    [
        pa.field("source_id", pa.int64(), nullable=False),
        pa.field("release", pa.string(), nullable=False),
        pa.field("score", pa.float32()),  # -log10 p of the combined components
        pa.field("p_value", pa.float64()),
        pa.field("rank", pa.int32(), nullable=False),  # 1 = strangest star of the release
        pa.field("n_components", pa.int32(), nullable=False),
        pa.field("driver", pa.string()),  # the component with the smallest p
        pa.field("modality_tag", pa.string()),  # lrs_only, xp_only, both or pair
        pa.field("windows", pa.string()),  # the strongest residual windows, named
        pa.field("explanation", pa.string()),
    ]
    + [
        field
        for c in SCORE_COMPONENTS
        for field in (pa.field(c, pa.float32()), pa.field(f"{c}_logp", pa.float32()))
    ]
    + [
        pa.field(f"{c}_peak", pa.float32())
        for c in ("recon_lrs", "cross_lrs", "recon_xp", "cross_xp")
    ]
    + [
        # the shape of the residuals (48 bins, unit vector): what triage compares
        pa.field("signature", pa.list_(pa.float16(), 48)),
        pa.field("snr_lrs", pa.float32()),  # median S/N per pixel, for context
        pa.field("snr_xp", pa.float32()),
        pa.field("reference", pa.string()),  # the release the calibration was frozen on
        pa.field("model_id", pa.string()),
    ]
)
"""One row per star of a scored release; each component's raw statistic and its -log10 p
against the frozen reference (``*_logp``), the window peaks of the residual components."""

MARKS = ("boring", "interesting", "artefact")
"""What a user may say of a star when triaging anomalies."""

MARKS_SCHEMA = pa.schema(
    [
        pa.field("source_id", pa.int64(), nullable=False),
        pa.field("release", pa.string()),  # the release the star was looked at in (or null)
        pa.field("mark", pa.string(), nullable=False),  # one of MARKS
        pa.field("note", pa.string()),
        pa.field("user", pa.string()),
        pa.field("time", pa.timestamp("s", tz="UTC"), nullable=False),
    ]
)
"""The user's marks: every mark ever made (the latest per star counts); scores never change."""

TRUTH_SCHEMA = pa.schema(
    [
        pa.field("source_id", pa.int64(), nullable=False),
        pa.field("anomaly_class", pa.string(), nullable=False),
        pa.field("parameters", pa.string()),  # JSON object with the injection parameters
    ]
)


def fixed_list(values: np.ndarray | None, width: int, n: int) -> pa.Array:
    """(n, width) float array with NaN rows meaning missing -> FixedSizeList<float32> with nulls.

    A NaN pixel in an otherwise valid row is stored as 0: the caller must already have given it
    ivar 0 (or an infinite error), as every reader does.
    """
    list_type = pa.list_(pa.float32(), width)
    if values is None:
        return pa.nulls(n, type=list_type)
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (n, width):
        raise InputError(f"array column has shape {values.shape}, expected ({n}, {width})")
    missing = np.all(np.isnan(values), axis=1)
    flat = pa.array(np.where(np.isnan(values), 0.0, values).ravel(), type=pa.float32())
    arr = pa.FixedSizeListArray.from_arrays(flat, width)
    if missing.any():
        arr = pa.FixedSizeListArray.from_arrays(flat, width, mask=pa.array(missing))
    return arr


def make_shard_table(
    source_id: np.ndarray,
    release: str,
    *,
    obsid: np.ndarray | None = None,
    lrs_flux: np.ndarray | None = None,
    lrs_ivar: np.ndarray | None = None,
    xp_flux: np.ndarray | None = None,
    xp_flux_error: np.ndarray | None = None,
    labels: dict[str, np.ndarray] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> pa.Table:
    """Build a canonical shard table from numpy arrays.

    Array inputs have shape (n, 1462) for LRS and (n, 343) for XP; a row of all-NaN marks a
    missing spectrum (stored as null). ``labels`` maps e.g. ``teff``/``teff_err`` to (n,) arrays;
    missing labels are NaN -> null. ``extra`` columns are carried through after the contract ones.
    """
    source_id = np.asarray(source_id, dtype=np.int64)
    n = len(source_id)
    labels = labels or {}
    columns: dict[str, pa.Array] = {
        "source_id": pa.array(source_id, type=pa.int64()),
        "obsid": pa.nulls(n, type=pa.int64())
        if obsid is None
        else pa.array(np.asarray(obsid, dtype=np.int64), mask=np.asarray(obsid) < 0),
        "release": pa.array([release] * n, type=pa.string()),
        "lrs_flux": fixed_list(lrs_flux, N_LRS, n),
        "lrs_ivar": fixed_list(lrs_ivar, N_LRS, n),
        "xp_flux": fixed_list(xp_flux, N_XP, n),
        "xp_flux_error": fixed_list(xp_flux_error, N_XP, n),
    }
    for field in SHARD_SCHEMA:
        if field.name in columns:
            continue
        values = labels.get(field.name)
        if values is None:
            columns[field.name] = pa.nulls(n, type=pa.float32())
        else:
            v = np.asarray(values, dtype=np.float32)
            columns[field.name] = pa.array(v, type=pa.float32(), mask=np.isnan(v))
    table = pa.table(columns, schema=SHARD_SCHEMA)
    for name, values in (extra or {}).items():
        table = table.append_column(name, pa.array(values))
    return table


def validate_shard(table: pa.Table, where: str = "shard", check_unique: bool = True) -> pa.Table:
    """Check a table against the canonical contract and cast it to the canonical types.

    Raises InputError (one line, naming ``where``) for missing columns, wrong array widths or a
    duplicate source_id. Extra columns are kept.
    """
    missing = [f.name for f in SHARD_SCHEMA if f.name not in table.column_names]
    # labels and optional arrays may be absent from a user shard: add them as nulls
    required = {"source_id", "release"}
    if required & set(missing):
        raise InputError(f"{where}: missing column(s) {', '.join(sorted(required & set(missing)))}")
    n = table.num_rows
    for name in missing:
        table = table.append_column(
            SHARD_SCHEMA.field(name), pa.nulls(n, SHARD_SCHEMA.field(name).type)
        )
    for name, width in (
        ("lrs_flux", N_LRS),
        ("lrs_ivar", N_LRS),
        ("xp_flux", N_XP),
        ("xp_flux_error", N_XP),
    ):
        col = table.column(name)
        if pa.types.is_fixed_size_list(col.type):
            if col.type.list_size != width:
                raise InputError(
                    f"{where}: column {name} has length {col.type.list_size}, expected {width}"
                )
        else:
            import pyarrow.compute as pc  # here: importing it costs sql and search ~0.1 s

            lengths = pc.list_value_length(col).fill_null(width).to_numpy()
            bad = np.flatnonzero(lengths != width)
            if bad.size:
                raise InputError(
                    f"{where}: row {int(bad[0])}: {name} has length {int(lengths[bad[0]])}, expected {width}"
                )
    if table.column("source_id").null_count:
        raise InputError(
            f"{where}: {table.column('source_id').null_count} row(s) without a source_id"
        )
    sid = table.column("source_id").to_numpy()
    uniq, counts = np.unique(sid, return_counts=True)
    if check_unique and (counts > 1).any():
        raise InputError(f"{where}: duplicate source_id {int(uniq[counts > 1][0])}")
    extras = [c for c in table.column_names if c not in SHARD_SCHEMA.names]
    ordered = table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    for name in extras:
        ordered = ordered.append_column(table.schema.field(name), table.column(name))
    return ordered


def column_matrix(table: pa.Table, name: str) -> np.ndarray:
    """FixedSizeList column -> (n, width) float32 array, null rows as NaN."""
    col = table.column(name).combine_chunks()
    width = col.type.list_size
    n = len(col)
    out = np.full((n, width), np.nan, dtype=np.float32)
    valid = ~col.is_null().to_numpy(zero_copy_only=False)
    if valid.any():
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        if len(flat) == n * width:  # nulls keep their slots in a fixed-size list
            out[valid] = flat.reshape(n, width)[valid]
        else:
            out[valid] = flat.reshape(-1, width)
    return out
