"""Make the figures of docs/simulator.md from the LRS simulator (all spectra here are SIMULATED).

    python scripts/make_sim_plots.py [--out docs/plots]

Deterministic: every panel uses a fixed seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from specsearch import grids  # noqa: E402
from specsearch.sim import lrs_synth, simulate  # noqa: E402

FEATURES = lrs_synth.feature_wavelengths()
SIM_NOTE = "SIMULATED LAMOST-like LRS (specsearch.sim.lrs_synth), not real data"


def label_features(ax, names, y, fontsize=7):
    for name in names:
        w = FEATURES[name]
        lo, hi = ax.get_xlim()
        if lo < w < hi:
            ax.axvline(w, color="0.5", lw=0.5, ls=":", zorder=0)
            ax.text(
                w, y, name, rotation=90, fontsize=fontsize, ha="center", va="bottom", color="0.25"
            )


def stars(**columns):
    n = max(np.size(v) for v in columns.values())
    return {k: np.broadcast_to(np.asarray(v, dtype=float), (n,)).copy() for k, v in columns.items()}


def teff_sequence(out: Path) -> None:
    teffs = [3300, 3500, 4500, 5500, 6500, 8000, 10000]
    loggs = [5.0, 4.8, 4.6, 4.5, 4.3, 4.2, 4.1]
    obs = lrs_synth.synthesize_lrs_full(
        stars(teff=teffs, logg=loggs, fe_h=0.0, snr=150.0), np.random.default_rng(1)
    )
    fig, axes = plt.subplots(1, 2, figsize=(15, 9), gridspec_kw={"width_ratios": [1.6, 1]})
    step = 0.9
    for i, t in enumerate(teffs):
        for ax in axes:
            ax.plot(
                obs.wavelength,
                obs.flux[i] + step * i,
                lw=0.5,
                color=plt.cm.turbo(0.92 - 0.84 * i / (len(teffs) - 1)),
            )
        axes[1].text(5620, step * i + 1.0, f"{t} K", fontsize=8)
    axes[0].set_xlim(3700, 9100)
    axes[1].set_xlim(3800, 5700)
    for ax in axes:
        ax.set_ylim(-0.1, step * len(teffs) + 0.9)
        ax.set_xlabel("vacuum wavelength (A)")
    axes[0].set_ylabel("continuum-normalised flux + offset")
    top = step * len(teffs) + 0.25
    label_features(
        axes[0],
        [
            "Ca II K",
            "Hdelta",
            "G band",
            "Hbeta",
            "Mg b",
            "Na D",
            "TiO 6159",
            "Halpha",
            "TiO 7054",
            "O2 A",
            "Ca II triplet",
        ],
        top,
    )
    label_features(
        axes[1],
        [
            "Ca II K",
            "Ca II H",
            "Hdelta",
            "Ca I 4227",
            "G band",
            "Hgamma",
            "Hbeta",
            "TiO 4955",
            "Mg b",
            "Fe 5270",
            "TiO 5448",
        ],
        top,
    )
    axes[1].axvspan(3999.5, 5598.4, color="0.93", zorder=-1)
    axes[1].text(4010, -0.05, "canonical grid 3999.5-5598.4 A", fontsize=7)
    fig.suptitle(f"Dwarfs across Teff, [Fe/H] = 0, S/N 150 -- {SIM_NOTE}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "lrs_teff_sequence.png", dpi=90)
    plt.close(fig)


def feh_sequence(out: Path) -> None:
    fe_h = [-2.5, -1.5, -1.0, -0.5, 0.0, 0.5]
    obs = lrs_synth.synthesize_lrs_full(
        stars(teff=5000.0, logg=4.6, fe_h=fe_h, snr=150.0), np.random.default_rng(2)
    )
    fig, axes = plt.subplots(2, 1, figsize=(13, 9), gridspec_kw={"height_ratios": [2.2, 1]})
    step = 0.7
    for i, z in enumerate(fe_h):
        color = plt.cm.viridis(i / (len(fe_h) - 1))
        axes[0].plot(obs.wavelength, obs.flux[i] + step * i, lw=0.6, color=color)
        axes[0].text(5610, step * i + 0.95, f"[Fe/H] = {z:+.1f}", fontsize=8)
        axes[1].plot(obs.wavelength, obs.noiseless[i], lw=0.8, color=color, label=f"{z:+.1f}")
    axes[0].set_xlim(3900, 5700)
    axes[0].set_ylim(-0.1, step * len(fe_h) + 0.8)
    label_features(
        axes[0],
        [
            "Ca II K",
            "Ca II H",
            "Hdelta",
            "Sr II 4077",
            "Ca I 4227",
            "G band",
            "Hgamma",
            "Fe I 4383",
            "Hbeta",
            "Mg b",
            "Fe 5270",
            "Fe 5335",
        ],
        step * len(fe_h) + 0.25,
    )
    axes[0].set_ylabel("normalised flux + offset")
    axes[1].set_xlim(5120, 5360)
    axes[1].set_ylim(0.35, 1.05)
    axes[1].legend(title="[Fe/H]", fontsize=7, ncol=6, loc="lower left")
    axes[1].set_ylabel("noiseless")
    axes[1].set_xlabel("vacuum wavelength (A)")
    label_features(axes[1], ["Mg b", "Fe 5270", "Fe 5335"], 0.37)
    fig.suptitle(
        f"Teff 5000 K, log g 4.6, [alpha/M] from the Galactic trend -- {SIM_NOTE}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out / "lrs_feh_sequence.png", dpi=90)
    plt.close(fig)


def dwarf_giant(out: Path) -> None:
    pairs = [
        (4000.0, "MgH 5000-5300 A", (4700, 5600), ["MgH", "Mg b", "TiO 4955", "TiO 5167"]),
        (
            4700.0,
            "CN, Sr II, Ca I, Mg b wings",
            (3850, 4450),
            ["CN 3883", "Ca II K", "Sr II 4077", "CN 4216", "Ca I 4227", "G band"],
        ),
        (8000.0, "Balmer wings (Stark)", (3800, 4450), ["Hdelta", "Hgamma", "Hepsilon", "Ca II K"]),
    ]
    fig, axes = plt.subplots(len(pairs), 1, figsize=(12, 10))
    for ax, (teff, what, xlim, names) in zip(axes, pairs, strict=True):
        obs = lrs_synth.synthesize_lrs_full(
            stars(teff=teff, logg=[4.6, 2.0], fe_h=0.0, snr=300.0), np.random.default_rng(3)
        )
        ax.plot(obs.wavelength, obs.flux[0], lw=0.8, color="tab:red", label="dwarf, log g 4.6")
        ax.plot(obs.wavelength, obs.flux[1], lw=0.8, color="tab:blue", label="giant, log g 2.0")
        ax.set_xlim(*xlim)
        ax.set_ylim(0.0, 1.25)
        ax.set_title(f"Teff {teff:.0f} K: {what}", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        label_features(ax, names, 1.02)
    axes[-1].set_xlabel("vacuum wavelength (A)")
    fig.suptitle(f"Dwarf vs giant at equal Teff, [Fe/H] = 0, S/N 300 -- {SIM_NOTE}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "lrs_dwarf_giant.png", dpi=90)
    plt.close(fig)


def raw_observation(out: Path) -> None:
    labels = stars(
        teff=[5800.0, 5800.0, 3600.0],
        logg=[4.4, 4.4, 4.8],
        fe_h=0.0,
        a_v=[0.1, 2.0, 0.2],
        snr=[80.0, 80.0, 20.0],
    )
    obs = lrs_synth.synthesize_lrs_full(labels, np.random.default_rng(4))
    fig, axes = plt.subplots(3, 1, figsize=(12, 10))
    titles = [
        "G2 dwarf, A_V 0.1, S/N 80",
        "the same star behind A_V = 2.0 (CCM, DIBs)",
        "M1 dwarf, S/N 20",
    ]
    for i, ax in enumerate(axes):
        err = np.where(obs.raw_ivar[i] > 0, 1 / np.sqrt(np.maximum(obs.raw_ivar[i], 1e-30)), np.nan)
        ax.plot(
            obs.wavelength, obs.raw_flux[i], lw=0.5, color="k", label="flux (relative F_lambda)"
        )
        ax.plot(obs.wavelength, err, lw=0.5, color="tab:red", label="1-sigma error")
        ax.plot(
            obs.wavelength, obs.continuum[i], lw=0.8, color="tab:green", label="pseudo-continuum"
        )
        ax.axvspan(5700, 5900, color="0.9", zorder=-1)
        ax.set_title(titles[i], fontsize=9)
        ax.set_xlim(3700, 9100)
        ax.set_ylim(0, np.nanpercentile(obs.raw_flux[i], 99.5) * 1.15)
        top = ax.get_ylim()[1] * 0.8
        label_features(
            ax, ["[O I] sky 5577", "Na D", "DIB 4428", "O2 A", "Halpha", "Ca II triplet"], top
        )
    axes[0].legend(fontsize=7, loc="upper right")
    axes[0].text(5710, 0.05 * axes[0].get_ylim()[1], "dichroic", fontsize=7)
    axes[-1].set_xlabel("vacuum wavelength (A)")
    fig.suptitle(
        f"Raw (flux-calibrated) spectra with noise, sky residuals, tellurics -- {SIM_NOTE}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "lrs_raw_observation.png", dpi=90)
    plt.close(fig)


def continuum_hard_cases(out: Path) -> None:
    """The continuum fit (`grids.canonical_lrs`) on raw spectra that could drag it."""
    cases = [
        ("M dwarf, 3300 K: TiO and MgH bands", dict(teff=3300.0, logg=4.9, fe_h=0.0)),
        (
            "carbon star, 4200 K giant: C2 Swan tau 1.5, CN x4, CH x2",
            dict(
                teff=4200.0, logg=1.5, fe_h=-0.3, c2=1.5, cn_scale=4.0, tio_scale=0.0, ch_scale=2.0
            ),
        ),
        (
            "emission-line star: H-alpha EW 100 A (H-beta 30 A), [O III] 5007 EW 100 A",
            dict(teff=5500.0, logg=4.4, fe_h=0.0, em_halpha=100.0, em_oiii=100.0),
        ),
        ("A0 dwarf, 9500 K: broad Balmer lines", dict(teff=9500.0, logg=4.1, fe_h=0.0)),
        ("metal-rich K dwarf, [Fe/H] +0.4: crowded lines", dict(teff=4300.0, logg=4.6, fe_h=0.4)),
    ]
    keys = set().union(*(c for _, c in cases))
    labels = {k: np.array([c.get(k, np.nan) for _, c in cases]) for k in keys}
    labels |= {"snr": np.full(len(cases), 60.0), "a_v": np.full(len(cases), 0.5)}
    obs = lrs_synth.synthesize_lrs_full(labels, np.random.default_rng(3))
    wave = lrs_synth.FULL_WAVELENGTH
    fit_flux, fit_ivar = grids.resample_lrs(wave, obs.raw_flux, obs.raw_ivar, grids.LRS_FIT_LOGLAM)
    continuum = grids.continuum_lrs(fit_flux, fit_ivar)
    true = grids.resample_lrs(
        wave, obs.continuum, np.ones_like(obs.continuum), grids.LRS_FIT_LOGLAM
    )[0]
    normalised = grids.canonical_lrs(wave, obs.raw_flux, obs.raw_ivar)[0]
    lam = 10.0**grids.LRS_FIT_LOGLAM
    fig, axes = plt.subplots(
        len(cases), 2, figsize=(15, 2.5 * len(cases)), gridspec_kw={"width_ratios": [1.3, 1]}
    )
    for i, (ax, ax_norm) in enumerate(axes):
        top = np.nanpercentile(fit_flux[i], 99.5) * 1.2
        ax.plot(lam, fit_flux[i], lw=0.5, color="k", label="raw flux")
        ax.plot(lam, continuum[i], lw=1.2, color="tab:red", label="fitted continuum")
        ax.plot(lam, true[i], lw=1.0, ls="--", color="tab:blue", label="true continuum")
        for edge in (grids.LRS_WAVELENGTH[0], grids.LRS_WAVELENGTH[-1]):
            ax.axvline(edge, color="0.6", lw=0.6, ls=":")
        ax.set_ylim(0, min(top, 2.5 * np.nanmax(continuum[i])))
        ax.set_xlim(lam[0], lam[-1])
        ax.set_title(cases[i][0], fontsize=9, loc="left")
        ax_norm.plot(grids.LRS_WAVELENGTH, normalised[i], lw=0.5, color="k")
        ax_norm.axhline(1.0, color="tab:red", lw=0.8)
        ax_norm.set_xlim(grids.LRS_WAVELENGTH[0], grids.LRS_WAVELENGTH[-1])
        ax_norm.set_ylim(0, 1.4 if i != 2 else 3.0)
        for a in (ax, ax_norm):
            a.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, loc="upper left")
    axes[0][0].text(
        0.99,
        0.05,
        "dotted: canonical grid; beyond: fitting margins",
        transform=axes[0][0].transAxes,
        fontsize=7,
        ha="right",
    )
    axes[0][1].set_title("normalised, canonical grid (what a shard holds)", fontsize=9)
    axes[-1][0].set_xlabel("vacuum wavelength (A)")
    axes[-1][1].set_xlabel("vacuum wavelength (A)")
    fig.suptitle(f"The LRS continuum fit on hard cases, S/N 60 -- {SIM_NOTE}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out / "lrs_continuum.png", dpi=80)
    plt.close(fig)


def _xp(emulator, labels, g_mag=12.0, seed=0, shape_hook=None, companion=None, ratio=0.0):
    """Noisy emulated XP (W m^-2 nm^-1) for one star; ``shape_hook`` edits the noiseless shape."""
    args = [
        np.atleast_1d(np.asarray(labels[k], dtype=float))
        for k in ("teff", "logg", "fe_h", "alpha_m")
    ]
    shape = emulator.predict_shape(*args, labels.get("a_v", 0.0))
    if shape_hook is not None:
        shape = shape_hook(shape)
    norm = emulator.norm_from_g(np.array([g_mag]), shape)
    flux = shape * norm[:, None]
    if companion is not None:
        c_args = [
            np.atleast_1d(np.asarray(companion[k], dtype=float))
            for k in ("teff", "logg", "fe_h", "alpha_m")
        ]
        flux = flux + simulate.binary_xp_flux(
            shape, emulator.predict_shape(*c_args, labels.get("a_v", 0.0)), norm, np.array([ratio])
        )
    rng = np.random.default_rng(seed)
    error = emulator.sample_error(flux / norm[:, None], norm, rng)
    return flux + emulator.sample_noise(error, rng), error


def anomalies(out: Path) -> None:
    """Every anomaly class next to its normal counterpart (same star, same noise draw)."""
    emulator = simulate.default_emulator()
    giant = {"teff": 4800.0, "logg": 2.5, "fe_h": -0.2, "alpha_m": 0.05, "a_v": 0.3, "snr": 60.0}

    def lrs(labels, seed=5):
        one = {
            k: (
                np.atleast_1d(np.asarray(v, dtype=float))
                if not isinstance(v, dict)
                else {kk: np.atleast_1d(vv) for kk, vv in v.items()}
            )
            for k, v in labels.items()
        }
        return lrs_synth.synthesize_lrs(one, np.random.default_rng(seed))

    rows = []
    # cross_match: the LRS is the giant's, the XP is a G dwarf's
    dwarf = {"teff": 5900.0, "logg": 4.4, "fe_h": 0.0, "alpha_m": 0.0, "a_v": 0.1}
    rows.append(
        (
            "cross_match",
            lrs(giant),
            lrs(giant),
            _xp(emulator, giant),
            _xp(emulator, dwarf, seed=1),
            "XP of another star (5900 K dwarf)",
        )
    )
    emission = {**giant, "em_halpha": 40.0, "em_oiii": 25.0}
    rows.append(
        (
            "emission_line",
            lrs(giant),
            lrs(emission),
            _xp(emulator, giant),
            _xp(emulator, giant, shape_hook=lambda s: simulate.xp_emission(s, np.array([40.0]))),
            "H-alpha EW 40 A, [O III] 5007 EW 25 A",
        )
    )
    companion = {"teff": 9000.0, "logg": 4.2, "fe_h": 0.0, "alpha_m": 0.0}
    binary = {**giant, "companion": companion, "flux_ratio": 0.6}
    rows.append(
        (
            "binary",
            lrs(giant),
            lrs(binary),
            _xp(emulator, giant),
            _xp(emulator, giant, companion=companion, ratio=0.6),
            "K giant + 9000 K dwarf, g-band flux ratio 0.6",
        )
    )
    cool = {**giant, "teff": 4200.0, "logg": 1.5}
    carbon = {**cool, "c2": 1.2, "cn_scale": 3.0, "tio_scale": 0.0, "ch_scale": 2.0}
    rows.append(
        (
            "carbon_star",
            lrs(cool),
            lrs(carbon),
            _xp(emulator, cool),
            _xp(
                emulator,
                cool,
                shape_hook=lambda s: (
                    s * simulate.xp_carbon_distortion(np.array([1.2]), np.array([3.0]))
                ),
            ),
            "C2 Swan tau 1.2, CN x3, no TiO",
        )
    )
    halo = {"teff": 5600.0, "logg": 3.8, "fe_h": -1.0, "alpha_m": 0.3, "a_v": 0.1, "snr": 60.0}
    poor = {**halo, "fe_h": -3.5, "alpha_m": 0.4}
    rows.append(
        (
            "metal_poor",
            lrs(halo),
            lrs(poor),
            _xp(emulator, halo),
            _xp(emulator, {**poor, "fe_h": simulate.XP_LOWEST_FE_H}),
            "[Fe/H] -3.5 vs -1.0 (XP emulated at -2.5)",
        )
    )
    flux, ivar = lrs(giant)
    # the LRS anomalies act on the raw observation, which then takes the ingest path
    raw = lrs_synth.synthesize_lrs_full(
        {k: np.atleast_1d(v) for k, v in giant.items()}, np.random.default_rng(5)
    )
    dead_flux, dead_ivar = raw.raw_flux.copy(), raw.raw_ivar.copy()
    simulate.apply_dead_fibre(
        dead_flux[0], dead_ivar[0], lrs_synth.CANONICAL_OFFSET + 500, 250, "zero_ivar"
    )
    xp_same = _xp(emulator, giant)
    rows.append(
        (
            "dead_fibre",
            (flux, ivar),
            grids.canonical_lrs(lrs_synth.FULL_WAVELENGTH, dead_flux, dead_ivar),
            xp_same,
            xp_same,
            "250 pixels zeroed (ivar 0)",
        )
    )
    broken = simulate.apply_calibration_break(
        lrs_synth.FULL_WAVELENGTH,
        raw.raw_flux,
        raw.raw_ivar,
        np.array([0.25]),
        np.array([4800.0]),
        np.array([40.0]),
    )
    rows.append(
        (
            "flux_tilt",
            (flux, ivar),
            grids.canonical_lrs(lrs_synth.FULL_WAVELENGTH, *broken),
            xp_same,
            xp_same,
            "raw flux x (1 + 0.25 tanh((lambda - 4800 A) / 40 A)): a calibration break",
        )
    )
    xp_flux, xp_err = xp_same
    bad = simulate.corrupt_xp_half(
        xp_flux,
        xp_err,
        np.array(["rp"]),
        np.array(["scaled"]),
        np.array([1.5]),
        np.array([0.0]),
        np.zeros_like(xp_flux),
    )
    rows.append(
        ("xp_corrupted", (flux, ivar), (flux, ivar), xp_same, (bad, xp_err), "RP half scaled x1.5")
    )

    fig, axes = plt.subplots(
        len(rows), 2, figsize=(14, 2.1 * len(rows)), gridspec_kw={"width_ratios": [2.2, 1]}
    )
    wave = grids.LRS_WAVELENGTH
    for ax_row, (name, normal, odd, xp_normal, xp_odd, note) in zip(axes, rows, strict=True):
        ax, ax_xp = ax_row
        ax.plot(wave, normal[0][0], lw=0.5, color="0.6", label="normal")
        shown = np.where(odd[1][0] > 0, odd[0][0], np.nan)
        ax.plot(wave, shown, lw=0.6, color="tab:red", label=name)
        flagged = odd[1][0] == 0
        if flagged.any():
            ax.plot(
                wave[flagged], odd[0][0][flagged], ".", ms=1, color="tab:purple", label="ivar = 0"
            )
        ax.set_xlim(wave[0], wave[-1])
        ax.set_ylim(-0.05, 2.0 if name == "emission_line" else 1.35)
        ax.set_ylabel("norm. flux", fontsize=8)
        ax.text(
            0.01,
            0.92,
            f"{name}: {note}",
            transform=ax.transAxes,
            fontsize=8,
            va="top",
            bbox={"fc": "white", "ec": "none", "alpha": 0.8},
        )
        scale = np.nanmax(xp_normal[0][0])
        ax_xp.plot(grids.XP_WAVELENGTH, xp_normal[0][0] / scale, lw=0.8, color="0.6")
        ax_xp.plot(grids.XP_WAVELENGTH, xp_odd[0][0] / scale, lw=0.8, color="tab:red")
        ax_xp.set_xlim(336, 1020)
        ax_xp.tick_params(labelsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, loc="lower right", ncol=3)
    axes[0][0].set_title("LRS, canonical grid (simulated)", fontsize=9)
    axes[0][1].set_title("Gaia XP (emulated from labels)", fontsize=9)
    axes[-1][0].set_xlabel("vacuum wavelength (A)")
    axes[-1][1].set_xlabel("wavelength (nm)")
    fig.suptitle(
        f"Injected anomalies (red) against the same star without them (grey) -- {SIM_NOTE}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out / "anomalies.png", dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/plots"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    teff_sequence(args.out)
    feh_sequence(args.out)
    dwarf_giant(args.out)
    raw_observation(args.out)
    continuum_hard_cases(args.out)
    anomalies(args.out)


if __name__ == "__main__":
    main()
