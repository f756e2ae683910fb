"""Labels and cross-spectrum prediction from a spectrum file or a store star."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.errors import SpecsearchError
from specsearch.files import write_parquet_atomic
from specsearch.pipeline.ingest import ingest
from specsearch.query.predict import predict_store, predict_table, translate_rows

from .conftest import synthetic_shard


@pytest.fixture()
def shard_file(tmp_path):
    path = tmp_path / "stars.parquet"
    write_parquet_atomic(synthetic_shard(20, 3, "Q"), path)
    return path


def test_predict_labels_for_both_modalities(shard_file, tiny_model):
    rows = pq.read_table(shard_file)
    table = predict_table(rows, str(tiny_model))
    assert table.num_rows == 20
    # every 10th star has no LRS: its LRS labels are null and the combined label is the XP one
    lrs_teff = table.column("lrs_teff").to_numpy(zero_copy_only=False)
    assert np.isnan(lrs_teff[[0, 10]].astype(float)).all()
    np.testing.assert_allclose(
        table.column("teff").to_numpy()[[0, 10]], table.column("xp_teff").to_numpy()[[0, 10]]
    )
    # elsewhere the combination is the inverse-variance mean, so its sigma is below each one's
    both = np.arange(20) % 10 != 0
    err = table.column("teff_err").to_numpy()[both]
    assert np.all(err <= table.column("xp_teff_err").to_numpy()[both] + 1e-3)
    assert np.all(err <= table.column("lrs_teff_err").to_numpy()[both] + 1e-3)


def test_predict_store_streams_every_star(tmp_path, shard_file, tiny_model):
    ingest(shard_file, tmp_path / "store", "DR1", show_progress=False)
    table = predict_store(tmp_path / "store", model=str(tiny_model))
    assert sorted(table.column("source_id").to_pylist()) == sorted(
        pq.read_table(shard_file).column("source_id").to_pylist()
    )


def test_translate_gives_the_target_grid(shard_file, tiny_model):
    rows = pq.read_table(shard_file)
    to_lrs = translate_rows(rows, "lrs", str(tiny_model))
    assert to_lrs.num_rows == 20 * 1462
    wl = to_lrs.column("wavelength_angstrom").to_numpy()[:1462]
    assert wl[0] == pytest.approx(3999.45, abs=0.1) and wl[-1] == pytest.approx(5598.87, abs=0.1)
    to_xp = translate_rows(rows, "xp", str(tiny_model))
    assert to_xp.num_rows == 18 * 343  # two stars have no LRS to translate from
    assert set(to_xp.column("unit").to_pylist()) == {"W m^-2 nm^-1"}
    with pytest.raises(SpecsearchError, match="--to must be lrs or xp"):
        translate_rows(rows, "uv", str(tiny_model))


def test_cli_predict_bad_file_is_one_line(tmp_path, tiny_model):
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    result = CliRunner().invoke(app, ["predict", str(bad), "--model", str(tiny_model)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_cli_translate_writes_csv(tmp_path, shard_file, tiny_model):
    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(
        app,
        [
            "translate",
            "--to",
            "lrs",
            "--spectrum",
            str(shard_file),
            "--model",
            str(tiny_model),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "source_id,wavelength_angstrom,predicted_flux,observed_flux,unit"
    assert len(lines) == 1 + 20 * 1462
