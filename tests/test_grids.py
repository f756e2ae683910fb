"""specsearch.grids: the canonical grids, resampling, continuum and model-input normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from specsearch import grids
from specsearch.grids import (
    LRS_LOGLAM,
    LRS_WAVELENGTH,
    N_LRS,
    N_XP,
    XP_WAVELENGTH,
    canonical_lrs,
    clean_flux_ivar,
    continuum_lrs,
    lrs_coverage,
    lrs_model_input,
    normalise_lrs,
    resample_lrs,
    xp_model_input,
    xp_norm,
)


def lamost_native_grid(start: float = 3.56825, n: int = 3909) -> np.ndarray:
    """A LAMOST-like log-linear grid (A) that does not share pixels with the canonical one."""
    return 10.0 ** (start + 1e-4 * np.arange(n))


def absorption_lines(wavelength: np.ndarray, depth: float = 0.5, sigma: float = 2.5) -> np.ndarray:
    centres = (4102.0, 4341.0, 4500.0, 4861.0, 5000.0, 5175.0, 5270.0)
    profile = np.ones_like(wavelength)
    for centre in centres:
        profile *= 1 - depth * np.exp(-0.5 * ((wavelength - centre) / sigma) ** 2)
    return profile


def test_canonical_grids():
    assert LRS_WAVELENGTH.shape == (N_LRS,) == (1462,)
    assert LRS_WAVELENGTH[0] == pytest.approx(3999.447, abs=1e-3)
    assert LRS_WAVELENGTH[-1] == pytest.approx(5598.866, abs=1e-3)
    assert np.allclose(np.diff(np.log10(LRS_WAVELENGTH)), 1e-4)
    assert XP_WAVELENGTH.shape == (N_XP,) == (343,)
    assert XP_WAVELENGTH[[0, 1, -1]].tolist() == [336.0, 338.0, 1020.0]
    # the XP normalisation window is 500-600 nm inclusive: 51 pixels
    window = XP_WAVELENGTH[grids.XP_NORM_SLICE]
    assert (window[0], window[-1], len(window)) == (500.0, 600.0, 51)


def test_resample_reproduces_a_spectrum_linear_in_loglam():
    wave = lamost_native_grid()
    flux = 2.0 + 30.0 * (np.log10(wave) - 3.7)  # linear interpolation in log lambda is exact
    out_flux, out_ivar = resample_lrs(wave, flux, np.ones_like(wave))
    expected = 2.0 + 30.0 * (LRS_LOGLAM - 3.7)
    assert out_flux.dtype == np.float32 and out_flux.shape == (N_LRS,)
    np.testing.assert_allclose(out_flux, expected, rtol=2e-6)
    assert (out_ivar > 0).all()


def test_resample_smooth_spectrum_is_accurate_and_batched():
    wave = lamost_native_grid()
    flux = np.stack([np.sin(wave / 50.0) + 2.0, 1e3 * (wave / 5000.0) ** -2])
    out_flux, out_ivar = resample_lrs(wave, flux, np.ones_like(flux))
    expected = np.stack(
        [np.sin(LRS_WAVELENGTH / 50.0) + 2.0, 1e3 * (LRS_WAVELENGTH / 5000.0) ** -2]
    )
    assert out_flux.shape == out_ivar.shape == (2, N_LRS)
    # linear interpolation error <= h^2/8 max|f''| with h ~ 1.2 A: ~7e-5 for the sine
    np.testing.assert_allclose(out_flux, expected, rtol=1e-4)


def test_resample_ivar_propagation_at_midpoints():
    # input pixels exactly half a canonical step off: every grid pixel has w = 0.5
    loglam = grids.LRS_LOGLAM_START - 0.5e-4 + 1e-4 * np.arange(N_LRS + 1)
    ivar = np.where(np.arange(N_LRS + 1) % 2 == 0, 4.0, 1.0)
    flux = np.arange(N_LRS + 1, dtype=float)
    out_flux, out_ivar = resample_lrs(10.0**loglam, flux, ivar)
    # var = 0.25 / 4 + 0.25 / 1 = 0.3125 -> ivar 3.2, for either parity of the left pixel
    np.testing.assert_allclose(out_ivar, 3.2, rtol=1e-5)
    np.testing.assert_allclose(out_flux, np.arange(N_LRS) + 0.5, rtol=1e-6)


def test_resample_outside_coverage_and_bad_pixels_get_ivar_zero():
    wave = lamost_native_grid(start=np.log10(4500.0))
    ivar = np.ones_like(wave)
    ivar[100] = 0.0  # one bad input pixel poisons the grid pixels on either side
    flux = np.ones_like(wave)
    flux[200] = np.nan  # NaN flux is a bad pixel too, never a NaN output
    out_flux, out_ivar = resample_lrs(wave, flux, ivar)
    below = LRS_WAVELENGTH < 4500.0
    assert below.sum() == 513
    assert (out_ivar[below] == 0).all() and (out_flux[below] == 0).all()
    assert np.isfinite(out_flux).all()
    bad = np.flatnonzero((out_ivar == 0) & ~below)
    # input pixel k sits between grid pixels; 2 grid pixels see input 100, 2 see input 200
    assert len(bad) == 4
    assert np.all(np.abs(LRS_WAVELENGTH[bad[:2]] - wave[100]) < 1.3)
    assert np.all(np.abs(LRS_WAVELENGTH[bad[2:]] - wave[200]) < 1.3)


def test_lrs_coverage():
    full = lrs_coverage(3700.0, 9100.0)
    assert full == pytest.approx(1.0)
    assert lrs_coverage(4500.0, 9100.0) == pytest.approx(
        (LRS_LOGLAM[-1] - np.log10(4500.0)) / (LRS_LOGLAM[-1] - LRS_LOGLAM[0]), rel=1e-9
    )
    assert lrs_coverage(5700.0, 9000.0) == 0.0  # a red-arm-only spectrum
    assert lrs_coverage(np.array([3700.0, 4800.0]), np.array([9100.0, 9100.0])).shape == (2,)


def test_clean_flux_ivar():
    flux, ivar = clean_flux_ivar(
        np.array([1.0, np.nan, np.inf, 2.0, 3.0]), np.array([1.0, 1.0, 1.0, -1.0, np.nan])
    )
    assert flux.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert ivar.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_continuum_of_absorption_spectrum_is_within_one_percent():
    true_continuum = 1.0 + 0.3 * (LRS_WAVELENGTH - 4800.0) / 800.0
    flux = true_continuum * absorption_lines(LRS_WAVELENGTH)
    flux = flux + np.random.default_rng(0).normal(0.0, 0.01, N_LRS)  # S/N 100
    ivar = np.full(N_LRS, 1e4)
    continuum = continuum_lrs(flux, ivar)
    assert np.abs(continuum / true_continuum - 1).max() < 0.01
    # flat continuum, noise free: the lines must not drag the fit down
    flat = continuum_lrs(absorption_lines(LRS_WAVELENGTH), ivar)
    assert np.abs(flat - 1).max() < 1e-3


def test_normalise_lrs_scales_ivar_by_continuum_squared():
    flux = 500.0 * absorption_lines(LRS_WAVELENGTH)[None, :].repeat(2, axis=0)
    ivar = np.full_like(flux, 1e-2)
    ivar[1, :100] = 0.0
    norm_flux, norm_ivar = normalise_lrs(flux, ivar)
    assert norm_flux.dtype == np.float32
    continuum = continuum_lrs(flux, ivar)
    np.testing.assert_allclose(norm_ivar, ivar * continuum**2, rtol=1e-5)
    np.testing.assert_allclose(np.median(norm_flux[0]), 1.0, atol=2e-3)
    assert (norm_ivar[1, :100] == 0).all()
    np.testing.assert_allclose(norm_ivar[0, 700], 1e-2 * 500.0**2, rtol=2e-3)


def test_lrs_model_input_zscores_good_pixels():
    flux = np.linspace(0.5, 1.5, N_LRS)
    ivar = np.ones(N_LRS)
    ivar[:462] = 0.0
    z, stats = lrs_model_input(flux, ivar)
    good = flux[462:]
    assert stats[0] == pytest.approx(good.mean(), rel=1e-6)
    assert stats[1] == pytest.approx(np.log10(good.std()), rel=1e-5)
    assert (z[:462] == 0).all()
    assert z[462:].mean() == pytest.approx(0.0, abs=1e-5) and z[462:].std() == pytest.approx(
        1.0, rel=1e-5
    )


def test_xp_model_input_divides_by_the_500_600nm_mean():
    shape = (XP_WAVELENGTH / 550.0) ** -2
    xp_flux = np.stack([3e-17 * shape, 5e-16 * shape])
    x, stats = xp_model_input(xp_flux)
    norm = xp_flux[:, grids.XP_NORM_SLICE].mean(axis=1)
    np.testing.assert_allclose(xp_norm(xp_flux), norm, rtol=1e-12)
    np.testing.assert_allclose(stats[:, 0], np.log10(norm), rtol=1e-6)
    # brightness only lives in stats: the normalised shapes of both stars are identical
    np.testing.assert_allclose(x[0], x[1], rtol=1e-6)
    assert x[0, grids.XP_NORM_SLICE].mean() == pytest.approx(1.0, rel=1e-6)
    assert x.shape == (2, N_XP) and x.dtype == np.float32


def test_xp_norm_non_positive_is_nan():
    assert np.isnan(xp_norm(-np.ones(N_XP)))
    x, stats = xp_model_input(-np.ones(N_XP))
    assert stats[0] == 0.0 and (x == -1).all()


def test_resample_identity_on_the_canonical_grid():
    flux, ivar = resample_lrs(LRS_WAVELENGTH, np.full(N_LRS, 2.0), np.ones(N_LRS))
    assert (ivar > 0).all() and np.allclose(flux, 2.0)


# --- the continuum fit on simulated raw LAMOST-like spectra (specsearch.sim: SIMULATED stars)

HARD_CASES = {  # labels of stars whose features could drag a continuum fit
    "G dwarf": dict(teff=5800.0, logg=4.4, fe_h=0.0),
    "metal-rich K dwarf": dict(teff=4300.0, logg=4.6, fe_h=0.4),
    "M dwarf": dict(teff=3300.0, logg=4.9, fe_h=0.0),
    "carbon star": dict(teff=4200.0, logg=1.5, fe_h=-0.3, c2=1.5, cn_scale=4.0, tio_scale=0.0),
    "emission-line star": dict(teff=5500.0, logg=4.4, fe_h=0.0, em_halpha=100.0, em_oiii=100.0),
    "A dwarf": dict(teff=9500.0, logg=4.1, fe_h=0.0),
}


def raw_observations(cases: list[dict], snr: float, seed: int = 0, a_v: float = 0.2):
    from specsearch.sim import lrs_synth

    keys = set().union(*cases)
    labels = {k: np.array([c.get(k, np.nan) for c in cases]) for k in keys}
    labels |= {"snr": np.full(len(cases), snr), "a_v": np.full(len(cases), a_v)}
    return lrs_synth.synthesize_lrs_full(labels, np.random.default_rng(seed))


def test_canonical_lrs_is_the_fit_grid_cut_to_the_canonical_one():
    assert grids.N_LRS_FIT == N_LRS + 160
    assert np.array_equal(grids.LRS_FIT_LOGLAM[grids.LRS_FIT_CANONICAL], LRS_LOGLAM)
    assert 10 ** grids.LRS_FIT_LOGLAM[0] == pytest.approx(3908.4, abs=0.1)
    assert 10 ** grids.LRS_FIT_LOGLAM[-1] == pytest.approx(5676.8, abs=0.1)


def test_smooth_raw_continua_normalise_to_the_same_spectrum():
    """The same star (same photons) under another flux scale, 3 mag of extinction, a response
    tilt or curvature: the normalised spectrum moves by a small fraction of its noise."""
    from specsearch.sim import lrs_synth

    obs = raw_observations(list(HARD_CASES.values()), snr=50.0)
    wave = lrs_synth.FULL_WAVELENGTH
    reference, ivar = canonical_lrs(wave, obs.raw_flux, obs.raw_ivar)
    x = (wave - 6400.0) / 2700.0
    u = (np.log10(wave) - 3.67) / 0.08  # -1..1 over the fitting grid
    factors = {
        "flux scale 1e-4": np.full_like(wave, 1e-4),
        "A_V = 3 mag (CCM)": 10 ** (-0.4 * 3.0 * lrs_synth.ccm_extinction(wave)),
        "response tilt 30%": 1 + 0.3 * x,
        "response curvature": 1 - 0.15 * x + 0.1 * x**2,
        "cubic in log lambda, in log flux": np.exp(0.4 * u - 0.3 * u**2 + 0.2 * u**3),
    }
    for name, factor in factors.items():
        flux, _ = canonical_lrs(wave, obs.raw_flux * factor, obs.raw_ivar / factor**2)
        pull = np.abs(flux - reference) * np.sqrt(ivar)
        assert np.median(pull) < 0.02, name
        assert pull.max() < 0.5, name
        # a scale cancels exactly (a cubic in the fit's variable only nearly: the 7-pixel
        # median filter sees the factor change across its window)
        if name.startswith("flux scale"):
            np.testing.assert_allclose(flux, reference, rtol=2e-6, atol=1e-6)


def test_features_do_not_drag_the_continuum():
    """Each hard case against its twin without the feature (S/N 1000): the normalised spectra's
    peaks sit at the same level, and emission leaves the continuum where it was."""
    from specsearch.sim import lrs_synth

    twins = {
        "carbon star": dict(teff=4200.0, logg=1.5, fe_h=-0.3, tio_scale=0.0),
        "emission-line star": dict(teff=5500.0, logg=4.4, fe_h=0.0),
        "M dwarf": dict(teff=3300.0, logg=4.9, fe_h=0.0, tio_scale=0.0),
    }
    cases = [HARD_CASES[name] for name in twins] + list(twins.values())
    obs = raw_observations(cases, snr=1000.0)
    flux, _, continuum = canonical_lrs(
        lrs_synth.FULL_WAVELENGTH, obs.raw_flux, obs.raw_ivar, with_continuum=True
    )
    k = len(twins)
    peaks = np.percentile(flux, 99, axis=1)  # where the continuum sits against the peaks
    for star in (0, 2):  # the carbon star's C2 + CN bands, the M dwarf's TiO bands
        assert abs(peaks[star] / peaks[k + star] - 1) < 0.03, peaks
        assert abs(peaks[star] - 1) < 0.1
    # against each star's true continuum (the twins sit on different fibres)
    fitted = continuum / lrs_synth.canonical_from_full(obs.continuum)
    emission = fitted[1] / fitted[k + 1]
    assert np.abs(emission - 1).max() < 0.005  # Balmer and [O III] emission: no pull at all


def test_hot_star_continuum_follows_the_true_one_between_broad_balmer_lines():
    from specsearch.sim import lrs_synth

    obs = raw_observations([HARD_CASES["A dwarf"], dict(teff=15000.0, logg=4.0)], snr=1000.0)
    _, _, continuum = canonical_lrs(
        lrs_synth.FULL_WAVELENGTH, obs.raw_flux, obs.raw_ivar, with_continuum=True
    )
    ratio = continuum / lrs_synth.canonical_from_full(obs.continuum)
    assert np.all(np.abs(ratio - 1) < 0.03)  # worst at 4000 A, in the H-epsilon/H8 wings
    assert np.all(np.mean(np.abs(ratio - 1) < 0.01, axis=1) > 0.85)


def test_continuum_ignores_a_dead_segment_and_low_snr_noise():
    from specsearch.sim import lrs_synth

    wave = lrs_synth.FULL_WAVELENGTH
    obs = raw_observations([HARD_CASES["G dwarf"]], snr=30.0, seed=3)
    flux, ivar = np.repeat(obs.raw_flux, 3, axis=0), np.repeat(obs.raw_ivar, 3, axis=0)
    dead = slice(lrs_synth.CANONICAL_OFFSET + 400, lrs_synth.CANONICAL_OFFSET + 900)
    flux[1, dead] = 0.0  # zero flux, ivar left as it was: the pipeline did not flag it
    flux[2, dead], ivar[2, dead] = 0.0, 0.0
    normalised, _, continuum = canonical_lrs(wave, flux, ivar, with_continuum=True)
    assert (normalised[1:, 400:900] == 0).all()
    # 500 of 1462 pixels gone: the continuum beside them moves by < 2% (7% without the
    # straightness penalty across the gap)
    assert np.abs(continuum[1:] / continuum[0] - 1).max() < 0.02
    # noise lifts an upper envelope: by about a quarter of the per-pixel noise (5% at S/N 5,
    # 1% at S/N 20), the same for real and simulated spectra since both take this path
    high = raw_observations([HARD_CASES["G dwarf"]], snr=1000.0, seed=4)
    level_high = np.median(canonical_lrs(wave, high.raw_flux, high.raw_ivar)[0])
    for snr in (5.0, 20.0):
        low = raw_observations([HARD_CASES["G dwarf"]] * 8, snr=snr, seed=4)
        level_low = np.median(canonical_lrs(wave, low.raw_flux, low.raw_ivar)[0], axis=1)
        assert 0.1 / snr < 1 - np.median(level_low) / level_high < 0.35 / snr
