"""The XP emulator: shipped weights, agreement with real test-split XP spectra, the error model,
the noise, the G relation and the label sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from specsearch.errors import SpecsearchError
from specsearch.grids import N_XP, XP_NORM_SLICE, XP_WAVELENGTH, xp_norm
from specsearch.sim.xp_emulator import (
    DEFAULT_CONFIG,
    DEFAULT_WEIGHTS,
    XPEmulator,
    own_vs_other_fraction,
    shape_residual_metrics,
    usable_stars,
)


@pytest.fixture(scope="module")
def emulator() -> XPEmulator:
    return XPEmulator.load_default()


@pytest.fixture(scope="module")
def test_stars() -> dict[str, np.ndarray]:
    return usable_stars("test")


def test_shipped_files_are_small_safetensors_and_json():
    size = DEFAULT_WEIGHTS.stat().st_size + DEFAULT_CONFIG.stat().st_size
    assert size < 3 * 2**20
    tensors = load_file(str(DEFAULT_WEIGHTS))
    assert tensors["mlp.head.weight"].shape == (N_XP, 256)
    config = json.loads(DEFAULT_CONFIG.read_text())
    assert "python -m specsearch.sim.xp_emulator --train" in config["command"]
    assert config["split_counts"]["reserved_rows_excluded"] > 0  # the reserved rows were dropped


def test_predict_shape_finite_normalised_deterministic(emulator):
    teff = np.array([3500.0, 4800.0, 5777.0, 6500.0, 9000.0, 15000.0])
    logg = np.array([0.8, 2.5, 4.44, 4.2, 4.0, 4.0])
    fe_h = np.array([-0.5, 0.0, 0.0, -1.5, np.nan, np.nan])
    alpha_m = np.array([0.2, 0.0, 0.0, 0.3, np.nan, np.nan])
    shape = emulator.predict_shape(teff, logg, fe_h, alpha_m, 0.5)
    assert shape.shape == (6, N_XP) and np.isfinite(shape).all() and (shape > 0).all()
    np.testing.assert_allclose(shape[:, XP_NORM_SLICE].mean(axis=1), 1.0, rtol=1e-12)
    again = XPEmulator.load_default().predict_shape(teff, logg, fe_h, alpha_m, 0.5)
    np.testing.assert_array_equal(shape, again)
    # scalar inputs broadcast to one star
    assert emulator.predict_shape(5777.0, 4.44, 0.0, 0.0).shape == (1, N_XP)


def test_physical_trends(emulator):
    blue, red = XP_WAVELENGTH < 450, XP_WAVELENGTH > 850
    teff = np.array([4000.0, 5000.0, 6000.0])
    hotter = emulator.predict_shape(teff, 4.5, 0.0, 0.0)
    colour = hotter[:, blue].mean(axis=1) / hotter[:, red].mean(axis=1)
    assert np.all(np.diff(colour) > 0)  # hotter is bluer
    reddened = emulator.predict_shape(5000.0, 4.5, 0.0, 0.0, np.array([0.0, 1.0, 2.0]))
    colour = reddened[:, blue].mean(axis=1) / reddened[:, red].mean(axis=1)
    assert np.all(np.diff(colour) < 0)  # extinction reddens
    # metallicity is ignored above 7000 K, used below
    hot = emulator.predict_shape(9000.0, 4.0, np.array([-1.0, 0.3, np.nan]), 0.0)
    np.testing.assert_allclose(hot[0], hot[1], rtol=1e-5)  # float32 rows of one batch
    np.testing.assert_allclose(hot[0], hot[2], rtol=1e-5)
    cool = emulator.predict_shape(4500.0, 2.5, np.array([-1.0, 0.3]), 0.0)
    assert np.abs(cool[0] / cool[1] - 1).max() > 0.02


def test_own_labels_beat_another_stars_labels(emulator, test_stars):
    fraction = own_vs_other_fraction(emulator, test_stars, np.random.default_rng(0))
    assert fraction >= 0.95, fraction


def test_residuals_on_the_real_test_split(emulator, test_stars):
    metrics = shape_residual_metrics(emulator, test_stars)
    assert metrics["n_stars"] > 4900
    assert metrics["median_abs_resid_over_error"] < 3.0
    assert metrics["median_relative_resid"] < 0.04


def test_g_relation_on_real_stars(emulator, test_stars):
    norm = xp_norm(test_stars["xp_flux"])
    shape = test_stars["xp_flux"] / norm[:, None]
    g = emulator.g_from_norm(norm, shape)
    assert np.median(np.abs(g - test_stars["phot_g_mean_mag"])) < 0.015
    np.testing.assert_allclose(emulator.norm_from_g(g, shape), norm, rtol=1e-10)


def test_error_model_matches_real_errors(emulator, test_stars):
    norm = xp_norm(test_stars["xp_flux"])
    shape = test_stars["xp_flux"] / norm[:, None]
    error = emulator.sample_error(shape, norm, np.random.default_rng(1))
    real = test_stars["xp_flux_error"]
    g = test_stars["phot_g_mean_mag"]
    for low, high in ((5, 11), (11, 13), (13, 14), (14, 15.1)):
        rows = (g >= low) & (g < high)
        ratio = np.median(error[rows] / real[rows])
        assert 0.85 < ratio < 1.15, (low, ratio)
        # the star-to-star spread of the error level is real too
        sim_spread = np.percentile(np.median(error[rows] / real[rows], axis=1), [16, 84])
        assert sim_spread[1] / sim_spread[0] > 1.3


def test_sample_spectrum_units_noise_and_correlation(emulator):
    rng = np.random.default_rng(2)
    n = 400
    flux, error = emulator.sample_spectrum(4800.0, 2.5, -0.2, 0.1, 0.3, g_mag=13.0, rng=rng)
    assert flux.shape == error.shape == (1, N_XP)
    assert 1e-17 < xp_norm(flux)[0] < 1e-15  # a G = 13 star in W m^-2 nm^-1
    labels = emulator.sample_labels(n, np.random.default_rng(3), teff_max=7000)
    flux, error = emulator.sample_spectrum(
        labels["teff"],
        labels["logg"],
        labels["fe_h"],
        labels["alpha_m"],
        labels["extinction"],
        g_mag=labels["g_mag"],
        rng=rng,
    )
    assert np.isfinite(flux).all() and (error > 0).all()
    shape = emulator.predict_shape(
        labels["teff"], labels["logg"], labels["fe_h"], labels["alpha_m"], labels["extinction"]
    )
    norm = emulator.norm_from_g(labels["g_mag"], shape)
    pull = (flux - shape * norm[:, None]) / error
    assert 0.95 < pull.std() < 1.05
    # neighbouring pixels are correlated as in real XP spectra (~0.8 at 2 nm)
    lag1 = np.mean(pull[:, 1:] * pull[:, :-1]) / np.mean(pull**2)
    assert 0.7 < lag1 < 0.9
    with pytest.raises(SpecsearchError):
        emulator.sample_spectrum(5000.0, 4.5, 0.0, 0.0, rng=rng)
    same = emulator.sample_spectrum(5000.0, 4.5, 0.0, 0.0, norm=1e-16, rng=np.random.default_rng(9))
    again = emulator.sample_spectrum(
        5000.0, 4.5, 0.0, 0.0, norm=1e-16, rng=np.random.default_rng(9)
    )
    np.testing.assert_array_equal(same[0], again[0])


def test_sample_labels_follow_the_train_split(emulator):
    labels = emulator.sample_labels(20000, np.random.default_rng(4))
    assert set(labels) == {
        "teff",
        "logg",
        "fe_h",
        "alpha_m",
        "extinction",
        "g_mag",
        "metallicity_known",
    }
    for name, values in labels.items():
        assert values.shape == (20000,) and np.isfinite(values.astype(float)).all(), name
    bank = emulator.label_bank
    for name in ("teff", "logg", "g_mag", "extinction"):
        assert np.median(labels[name]) == pytest.approx(np.median(bank[name]), rel=0.05, abs=0.03)
    hot = labels["teff"] > 7300  # beyond the 1% jitter of the 7000 K edge
    assert hot.mean() > 0.05 and not labels["metallicity_known"][hot].any()
    assert labels["extinction"].min() >= 0
    again = emulator.sample_labels(20000, np.random.default_rng(4))
    np.testing.assert_array_equal(labels["teff"], again["teff"])
    assert (
        emulator.sample_labels(1000, np.random.default_rng(5), teff_max=7000)["teff"].max() < 7300
    )
