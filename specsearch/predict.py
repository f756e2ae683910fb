"""Stellar labels and cross-spectrum prediction for stars in a store or in a spectrum file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import SpecsearchError
from .grids import LRS_WAVELENGTH, XP_WAVELENGTH
from .output import emit_table
from .schema import LABELS, column_matrix
from .store import Store

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
    from .inference import SpecCLIPRunner

    runner = SpecCLIPRunner(model, device=device)
    predicted = runner.predict_labels(**_spectra(rows))
    return label_table(rows.column("source_id").to_numpy(), predicted)


def predict_store(
    store: str | os.PathLike, release: str | None = None, model: str = "default"
) -> pa.Table:
    """Labels for every star of a store (or one release), streamed over its shards."""
    st = Store(store, create=False)
    parts = [
        predict_table(pa.Table.from_batches([batch]), model)
        for batch in st.iter_shard_batches(release, columns=SPECTRUM_COLUMNS, batch_size=4096)
        if batch.num_rows
    ]
    if not parts:
        raise SpecsearchError(f"{st.root}: no stars to predict")
    return pa.concat_tables(parts)


def predict_cli(
    file: Path | None,
    store: Path | None,
    release: str | None,
    model: str,
    fmt: str,
    output: Path | None = None,
) -> None:
    if (file is None) == (store is None):
        raise SpecsearchError("give a spectrum FILE or --store (not both)")
    if file is not None:
        from .ingest import read_source

        table = predict_table(read_source(file)[0], model)
    else:
        table = predict_store(store, release, model)
    emit_table(table, fmt, output, title=f"stellar labels ({model})")


def _rows_for(store: Path, source_id: int) -> pa.Table:
    st = Store(store, create=False)
    rows = st.shards().to_table(columns=SPECTRUM_COLUMNS, filter=pc.field("source_id") == source_id)
    if rows.num_rows == 0:
        raise SpecsearchError(f"source_id {source_id} is not in {st.root}")
    return rows.slice(rows.num_rows - 1, 1)  # the latest release's row


def translate_rows(rows: pa.Table, to: str, model: str = "default") -> pa.Table:
    """Cross-spectrum prediction for canonical rows, as a long table (one row per pixel).

    to="xp": the XP spectrum predicted from the LRS (W m^-2 nm^-1 when the star has an observed
    XP to set the flux scale, else flux / mean flux over 500-600 nm); to="lrs": the continuum-
    normalised LRS predicted from the XP. The observed target spectrum is included where present.
    """
    from .inference import SpecCLIPRunner

    if to not in ("lrs", "xp"):
        raise SpecsearchError(f"--to must be lrs or xp, not {to!r}")
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


def translate_cli(
    to: str,
    source_id: int | None,
    spectrum: Path | None,
    store: Path | None,
    model: str,
    output: Path | None,
) -> None:
    if (source_id is None) == (spectrum is None):
        raise SpecsearchError("give exactly one of --source-id (with --store) or --spectrum")
    if source_id is not None:
        if store is None:
            raise SpecsearchError("--source-id needs --store")
        rows = _rows_for(store, source_id)
    else:
        from .ingest import read_source

        rows = read_source(spectrum)[0]
    table = translate_rows(rows, to, model)
    if output is None:
        stars = len(np.unique(table.column("source_id").to_numpy()))
        summary = pa.table(
            {
                "source_id": np.unique(table.column("source_id").to_numpy()),
            }
        )
        emit_table(
            summary,
            "table",
            title=f"predicted {to.upper()} spectra for {stars} star(s); use --output FILE.parquet|.csv for the pixels",
        )
        return
    fmt = "csv" if str(output).endswith(".csv") else "parquet"
    emit_table(table, fmt, output)
    print(f"translate: {table.num_rows} pixels of predicted {to.upper()} written to {output}")
