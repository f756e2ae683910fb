"""Stellar labels and cross-spectrum prediction for stars in a store or in a spectrum file."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import SpecsearchError
from ..grids import LRS_WAVELENGTH, XP_WAVELENGTH
from ..schema import LABELS, check_modality, column_matrix
from ..store import Store

SPECTRUM_COLUMNS = ["source_id", "lrs_flux", "lrs_ivar", "xp_flux", "xp_flux_error"]


def label_table(source_id: np.ndarray, predicted: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """source_id + combined labels with sigma + each modality's labels (pred_<label>[_err], lrs_/xp_)."""
    columns: dict[str, np.ndarray] = {"source_id": np.asarray(source_id, dtype=np.int64)}
    for prefix, key in (("", "labels"), ("lrs_", "lrs_labels"), ("xp_", "xp_labels")):
        for label in LABELS:
            columns[f"{prefix}{label}"] = predicted[key][label]
            columns[f"{prefix}{label}_err"] = predicted[key][f"{label}_err"]
    table = pa.table(columns)
    # NaN means "not predicted" (missing modality): store it as null
    return pa.table(
        {
            name: pa.array(col.to_numpy(), mask=np.isnan(col.to_numpy()))
            if name != "source_id"
            else col
            for name, col in zip(table.column_names, table.columns, strict=True)
        }
    )


def _spectra(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: column_matrix(table, name) for name in SPECTRUM_COLUMNS[1:]}


def predict_table(rows: pa.Table, model: str = "default", device: str = "auto") -> pa.Table:
    """Labels with uncertainties for canonical rows (either modality or both)."""
    from ..models.runner import SpecCLIPRunner

    runner = SpecCLIPRunner(model, device=device)
    predicted = runner.predict_labels(**_spectra(rows))
    return label_table(rows.column("source_id").to_numpy(), predicted)


def predict_store(
    store: str | os.PathLike | Store, release: str | None = None, model: str = "default"
) -> pa.Table:
    """Labels for the current row of every star of a store (or for every row of one release),
    streamed over its shards."""
    st = Store.open(store)
    parts = [
        predict_table(pa.Table.from_batches([batch]), model)
        for batch in st.iter_shard_batches(release, columns=SPECTRUM_COLUMNS, batch_size=4096)
        if batch.num_rows
    ]
    if not parts:
        raise SpecsearchError(f"{st.root}: no stars to predict")
    return pa.concat_tables(parts)


def rows_for(store: str | os.PathLike | Store, source_id: int) -> pa.Table:
    """The current canonical row (spectra only) of one star of a store."""
    st = Store.open(store)
    rows = st.read_shards(columns=SPECTRUM_COLUMNS, source_ids=np.array([source_id]))
    if rows.num_rows == 0:
        raise SpecsearchError(f"source_id {source_id} is not in {st.root}")
    return rows


def translate_rows(rows: pa.Table, to: str, model: str = "default") -> pa.Table:
    """Cross-spectrum prediction for canonical rows, as a long table (one row per pixel).

    to="xp": the XP spectrum predicted from the LRS (W m^-2 nm^-1 when the star has an observed
    XP to set the flux scale, else flux / mean flux over 500-600 nm); to="lrs": the continuum-
    normalised LRS predicted from the XP. The observed target spectrum is included where present.
    """
    from ..models.runner import SpecCLIPRunner

    check_modality(to, "to")
    source = "xp" if to == "lrs" else "lrs"
    present = pc.is_valid(rows.column(f"{source}_flux")).to_numpy(zero_copy_only=False)
    if not present.any():
        raise SpecsearchError(f"no {source.upper()} spectrum to translate from")
    rows = rows.filter(pa.array(present))
    spectra = _spectra(rows)
    runner = SpecCLIPRunner(model)
    has_target = pc.is_valid(rows.column(f"{to}_flux")).to_numpy(zero_copy_only=False)
    if to == "xp":
        normalised = not has_target.all()
        predicted = runner.translate(
            "xp",
            lrs_flux=spectra["lrs_flux"],
            lrs_ivar=spectra["lrs_ivar"],
            xp_flux=None if normalised else spectra["xp_flux"],
            normalised=normalised,
        )
        wavelength, unit = XP_WAVELENGTH * 10.0, "flux / norm" if normalised else "W m^-2 nm^-1"
    else:
        predicted = runner.translate(
            "lrs", xp_flux=spectra["xp_flux"], xp_flux_error=spectra["xp_flux_error"]
        )
        wavelength, unit = LRS_WAVELENGTH, "continuum-normalised"
    observed = spectra[f"{to}_flux"]
    n, m = predicted.shape
    return pa.table(
        {
            "source_id": np.repeat(rows.column("source_id").to_numpy(), m),
            "wavelength_angstrom": np.tile(wavelength, n).astype(np.float32),
            "predicted_flux": predicted.ravel(),
            "observed_flux": pa.array(observed.ravel(), mask=np.isnan(observed.ravel())),
            "unit": [unit] * (n * m),
        }
    )
