"""The LAMOST-like LRS simulator: shapes, determinism, noise model and the physics it encodes."""

import numpy as np
import pytest

from specsearch import grids
from specsearch.sim import lrs_synth

WAVE = grids.LRS_WAVELENGTH
VAC = lrs_synth.air_to_vacuum


def noiseless(rng_seed=0, **labels):
    """The physics alone: noiseless spectra divided by the true pseudo-continuum."""
    n = max(np.size(v) for v in labels.values())
    labels = {
        k: np.broadcast_to(np.asarray(v, dtype=float), (n,)).copy() for k, v in labels.items()
    }
    _, _, clean = lrs_synth.synthesize_lrs(
        labels, np.random.default_rng(rng_seed), normalisation="true", return_noiseless=True
    )
    return clean


def equivalent_width(spectra, centre_air, half_width):
    """EW (A) of the noiseless normalised spectra within +-half_width of a line (air wavelength)."""
    window = np.abs(WAVE - VAC(centre_air)) < half_width
    return ((1.0 - spectra[:, window]) * np.gradient(WAVE)[window]).sum(axis=1)


def test_grids_line_up_exactly():
    assert lrs_synth.CANONICAL_OFFSET == 338
    np.testing.assert_allclose(
        lrs_synth.canonical_from_full(lrs_synth.FULL_WAVELENGTH), WAVE, rtol=1e-12
    )
    assert lrs_synth.FULL_WAVELENGTH[0] == pytest.approx(3700.0, abs=1.0)
    assert lrs_synth.FULL_WAVELENGTH[-1] > 9000.0


def test_air_to_vacuum_matches_the_standard():
    assert VAC(5000.0) == pytest.approx(5001.395, abs=0.002)
    assert VAC(6562.80) == pytest.approx(6564.61, abs=0.01)  # H-alpha


def test_shapes_dtypes_and_determinism():
    labels = {
        "teff": np.array([3500.0, 5800.0, 9000.0]),
        "logg": np.array([4.8, 4.4, 4.0]),
        "rv": np.array([-120.0, 0.0, 45.0]),
    }
    flux, ivar = lrs_synth.synthesize_lrs(labels, np.random.default_rng(7))
    again, ivar2 = lrs_synth.synthesize_lrs(labels, np.random.default_rng(7))
    other, _ = lrs_synth.synthesize_lrs(labels, np.random.default_rng(8))
    assert flux.shape == ivar.shape == (3, grids.N_LRS)
    assert flux.dtype == ivar.dtype == np.float32
    assert np.isfinite(flux).all() and (ivar >= 0).all()
    assert np.array_equal(flux, again) and np.array_equal(ivar, ivar2)
    assert not np.array_equal(flux, other)


def test_ivar_matches_the_injected_noise():
    n = 1500
    labels = {
        "teff": np.linspace(3400, 9500, n),
        "logg": np.linspace(1.0, 5.0, n)[::-1],
        "snr": np.full(n, 25.0),
        "rv": np.linspace(-200, 200, n),
    }
    flux, ivar, clean = lrs_synth.synthesize_lrs(
        labels, np.random.default_rng(3), return_noiseless=True
    )
    good = ivar > 0
    pulls = (flux - clean)[good] * np.sqrt(ivar[good])
    assert abs(pulls.std() - 1.0) < 0.05
    assert abs(pulls.mean()) < 0.01
    assert good.mean() > 0.999  # only a few pipeline-masked pixels


def test_g_band_snr_is_the_requested_one():
    labels = {"teff": np.full(400, 5500.0), "snr": np.full(400, 40.0)}
    flux, ivar, clean = lrs_synth.synthesize_lrs(
        labels, np.random.default_rng(4), return_noiseless=True
    )
    g = (WAVE > 4000) & (WAVE < 5500)
    snr = np.median(clean[:, g] * np.sqrt(ivar[:, g]), axis=1)
    assert np.median(snr) == pytest.approx(40.0, rel=0.15)


def test_balmer_lines_peak_in_a_stars():
    ew = equivalent_width(
        noiseless(teff=[4000.0, 5000.0, 9500.0], logg=[4.6, 4.6, 4.2]), 4861.33, 15.0
    )
    assert ew[2] > 1.8 * ew[1] and ew[2] > 1.8 * ew[0]
    assert ew[2] > 7.0  # A0 dwarfs: H-beta EW ~ 10-15 A


def test_metal_lines_grow_with_metallicity():
    spectra = noiseless(teff=5000.0, logg=4.6, fe_h=[-2.0, -1.0, 0.0, 0.4])
    for centre, half in ((4226.73, 6.0), (5269.54, 4.0), (4383.55, 4.0)):
        ew = equivalent_width(spectra, centre, half)
        assert np.all(np.diff(ew) > 0), (centre, ew)
        assert ew[2] > 3 * ew[0]
    # curve of growth: d log EW / d [Fe/H] is below 1 and falls as the line saturates
    slope = np.diff(np.log10(equivalent_width(spectra, 4226.73, 6.0))) / np.diff(
        [-2.0, -1.0, 0.0, 0.4]
    )
    assert np.all(slope < 0.9) and slope[0] > slope[2]


def test_gravity_broadens_the_balmer_wings_of_a_stars():
    spectra = noiseless(teff=8000.0, logg=[4.3, 2.0])
    centre = VAC(4101.74)
    wings = (np.abs(WAVE - centre) > 8) & (np.abs(WAVE - centre) < 30)
    depression = (1 - spectra[:, wings]).mean(axis=1)
    assert depression[0] > 2 * depression[1]


def test_mgh_is_a_dwarf_feature():
    spectra = noiseless(teff=4000.0, logg=[4.7, 1.8])
    band = (WAVE > VAC(5050)) & (WAVE < VAC(5160))
    index = (1 - spectra[:, band]).mean(axis=1)
    assert index[0] > 2 * index[1]


def test_tio_dominates_m_dwarfs():
    spectra = noiseless(teff=[3300.0, 4500.0], logg=[4.9, 4.6])
    head = VAC(5448.0)
    below = (WAVE > head - 25) & (WAVE < head - 5)
    above = (WAVE > head + 5) & (WAVE < head + 25)
    jump = spectra[:, below].mean(axis=1) - spectra[:, above].mean(axis=1)
    assert jump[0] > 0.15 and jump[1] < 0.05  # a sharp band head only in the M dwarf


def test_radial_velocity_moves_the_lines():
    spectra = noiseless(teff=9000.0, logg=4.2, rv=[0.0, 300.0])
    near = np.abs(WAVE - VAC(4861.33)) < 20
    centre = [WAVE[near][np.argmin(s[near])] for s in spectra]
    expected = VAC(4861.33) * 300.0 / lrs_synth.C_KMS
    assert centre[1] - centre[0] == pytest.approx(expected, abs=1.5)
    assert lrs_synth.quantised_rv(np.array([300.0]))[0] == pytest.approx(300.0, abs=4.5)


def test_emission_binary_and_carbon_change_the_right_places():
    base = {"teff": np.full(4, 4500.0), "logg": np.full(4, 2.5)}
    clean = noiseless(**base)[0]
    emission = noiseless(**base, em_halpha=60.0)[0]
    hb = np.abs(WAVE - VAC(4861.33)) < 3
    assert emission[hb].max() > 1.5 and clean[hb].max() < 1.0
    carbon = noiseless(**base, c2=1.2, tio_scale=0.0)[0]
    swan = (WAVE > VAC(5080)) & (WAVE < VAC(5160))
    assert (clean[swan] - carbon[swan]).mean() > 0.2
    binary = lrs_synth.synthesize_lrs(
        {
            **base,
            "companion": {"teff": np.full(4, 9500.0), "logg": np.full(4, 4.2)},
            "flux_ratio": np.array([0.0, 1.0, 1.0, 1.0]),
        },
        np.random.default_rng(0),
        return_noiseless=True,
    )[2]
    # a hot companion dilutes the metal lines and adds Balmer absorption
    ca = equivalent_width(binary, 4226.73, 6.0)
    assert ca[1] < 0.7 * ca[0]


def test_full_grid_has_the_red_arm_and_raw_flux():
    obs = lrs_synth.synthesize_lrs_full(
        {"teff": np.array([5800.0]), "snr": np.array([50.0])}, np.random.default_rng(1)
    )
    assert obs.flux.shape == (1, lrs_synth.N_FULL)
    assert obs.raw_flux is not None and np.isfinite(obs.raw_flux).all()
    halpha = np.abs(obs.wavelength - VAC(6562.80)) < 3
    assert obs.noiseless[0, halpha].min() < 0.8
    # the stitched dichroic region is noisier than its neighbours
    err = 1 / np.sqrt(obs.ivar[0])
    assert (
        err[np.abs(obs.wavelength - lrs_synth.DICHROIC_A) < 20].mean()
        > 1.2 * err[np.abs(obs.wavelength - 6300) < 20].mean()
    )
