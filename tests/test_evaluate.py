"""The pure functions of benchmarks/evaluate.py (no trained model needed)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

EVALUATE_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluate.py"


def _load_evaluate():
    spec = importlib.util.spec_from_file_location("benchmark_evaluate", EVALUATE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ev = _load_evaluate()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


# --- robust statistics and calibration


def test_robust_stats_of_a_gaussian_sample():
    rng = np.random.default_rng(1)
    ref = rng.uniform(4000, 6000, 20000)
    pred = ref + 0.5 + rng.normal(0.0, 2.0, ref.size)
    stats = ev.robust_stats(pred, ref)
    assert stats["n"] == 20000
    assert stats["sigma"] == pytest.approx(2.0, rel=0.05)
    assert stats["bias"] == pytest.approx(0.5, abs=0.05)


def test_robust_stats_ignores_outliers_and_nan():
    rng = np.random.default_rng(2)
    resid = rng.normal(0.0, 1.0, 5000)
    resid[:100] = 1e4  # 2% wild outliers barely move a biweight scale
    ref = np.zeros(5100)
    pred = np.concatenate([resid, np.full(100, np.nan)])
    ref[5000:5050] = np.nan
    stats = ev.robust_stats(pred, ref)
    assert stats["n"] == 5000
    assert stats["sigma"] == pytest.approx(1.0, rel=0.06)
    assert math.isnan(ev.robust_stats([1.0], [np.nan])["sigma"])


def test_calibration_fraction_on_hand_made_and_gaussian_errors():
    pred = np.array([0.5, 1.5, 2.5, 9.0, 1.0])
    ref = np.zeros(5)
    sigma = np.array([1.0, 1.0, 1.0, np.nan, 0.0])  # the last two rows are not scored
    assert ev.calibration_fraction(pred, ref, sigma) == pytest.approx(1 / 3)
    rng = np.random.default_rng(3)
    sigma = rng.uniform(0.5, 2.0, 40000)
    pred = rng.normal(0.0, sigma)
    assert ev.calibration_fraction(pred, np.zeros_like(pred), sigma) == pytest.approx(
        0.6827, abs=0.01
    )
    # errors twice too small: 38% inside, residuals twice the claimed scale
    assert ev.calibration_fraction(pred, 0 * pred, sigma / 2) == pytest.approx(0.383, abs=0.01)
    assert ev.normalised_residual_scale(pred, 0 * pred, sigma / 2) == pytest.approx(2.0, rel=0.05)
    assert math.isnan(ev.calibration_fraction([1.0], [0.0], [np.nan]))


def test_label_metrics_score_every_method_on_the_same_stars():
    rng = np.random.default_rng(9)
    n = 4000
    truth = rng.uniform(-1.0, 0.5, n)
    truth[:500] = np.nan  # e.g. [Fe/H] of hot stars: unknown
    truth_err = np.full(n, 0.05)
    sigma = np.full(n, 0.1)
    model = truth + rng.normal(0.0, 0.1, n)
    baseline = truth + 0.2 + rng.normal(0.0, 0.3, n)
    baseline[500:600] = np.nan  # a baseline without an answer drops the star for everyone
    entry = ev.label_metrics(
        truth, truth_err, {ev.MODEL_KEY: model, "baseline_mlp": baseline}, sigma
    )
    assert entry[ev.MODEL_KEY]["n"] == entry["baseline_mlp"]["n"] == 3400
    assert entry[ev.MODEL_KEY]["sigma"] == pytest.approx(0.1, rel=0.06)
    assert entry["baseline_mlp"]["sigma"] == pytest.approx(0.3, rel=0.06)
    assert entry["baseline_mlp"]["bias"] == pytest.approx(0.2, abs=0.02)
    model_entry = entry[ev.MODEL_KEY]
    assert model_entry["calib_frac_sigma_pred"] == pytest.approx(0.683, abs=0.025)
    # with the 0.05 reference error added in quadrature: |N(0,1)| < 1.118
    assert model_entry["calib_frac_sigma_pred_plus_apogee"] == pytest.approx(0.736, abs=0.025)
    assert model_entry["normalised_resid_scale"] == pytest.approx(1.0, rel=0.06)
    assert entry["median_apogee_err"] == pytest.approx(0.05)


def test_quadrature():
    assert ev.quadrature(np.array([3.0]), np.array([4.0]))[0] == pytest.approx(5.0)


# --- retrieval


def test_retrieval_of_identical_embeddings_is_perfect():
    emb = unit_vectors(500, 16)
    result = ev.retrieval_accuracy(emb, emb, chunk=64)
    assert result["top1"] == 1.0 and result["top10"] == 1.0
    assert result["median_rank"] == 0.0
    assert result["chance_top10"] == pytest.approx(10 / 500)


def test_retrieval_of_a_known_permutation():
    emb = unit_vectors(400, 32, seed=4)
    perm = np.random.default_rng(5).permutation(400)
    perm[:100] = np.arange(100)  # 100 fixed points and then whatever the rest gives
    fixed = float(np.mean(perm == np.arange(400)))
    # query i's best candidate is the j with perm[j] == i: correct only at a fixed point
    result = ev.retrieval_accuracy(emb, emb[perm], ks=(1,))
    assert result["top1"] == pytest.approx(fixed)
    # scaling does not matter: rows are L2-normalised
    assert ev.retrieval_accuracy(3.0 * emb, emb[perm], ks=(1,))["top1"] == pytest.approx(fixed)


def test_partner_ranks_on_a_hand_made_score_matrix():
    n = 50
    # scores[i, j]: 0.5 for the partner (j == i), 1 for j > i, 0 for j < i -> rank n - 1 - i
    scores = np.triu(np.ones((n, n)), k=1) + 0.5 * np.eye(n)
    query, candidates = np.eye(n), scores.T
    ranks = ev.partner_ranks(query, candidates, chunk=7)
    np.testing.assert_array_equal(ranks, n - 1 - np.arange(n))
    # top-k accuracy is then exactly k / n
    assert np.mean(ranks < 10) == pytest.approx(10 / n)


def test_partner_ranks_do_not_depend_on_the_chunk():
    a, b = unit_vectors(300, 8, seed=6), unit_vectors(300, 8, seed=7)
    np.testing.assert_array_equal(ev.partner_ranks(a, b, chunk=1), ev.partner_ranks(a, b, 1000))
    with pytest.raises(ValueError):
        ev.partner_ranks(a, b[:10])


# --- summaries and verdicts


def test_top_k_indices_are_the_best_scores_in_order():
    query = unit_vectors(50, 8, seed=3)
    candidates = unit_vectors(300, 8, seed=4)
    top = ev.top_k_indices(query, candidates, k=5, chunk=7)
    scores = query @ candidates.T
    np.testing.assert_array_equal(top, np.argsort(-scores, axis=1)[:, :5])


def test_oracle_neighbours_are_the_nearest_in_scaled_labels():
    # teff in K and logg in dex: scaled by their spreads, each matters as much as the other
    labels = np.array(
        [[5000.0, 4.0, 0.0], [5010.0, 4.0, np.nan], [5000.0, 3.0, 0.0], [6000.0, 4.0, 0.0]]
    )
    labels = np.vstack([labels, [[5000.0 + 1000 * i, 1.0 + i, 0.5] for i in range(6)]])
    top = ev.oracle_top_k(labels, k=2, chunk=3)
    assert top[0, 0] == 0 and top[0, 1] == 1  # itself, then 10 K away (its NaN [Fe/H] adds 0)
    assert top[1, 1] == 0


def test_neighbour_label_distance_is_a_median_of_medians():
    labels = np.array([[5000.0, 4.0], [5100.0, 4.5], [5400.0, 3.0], [np.nan, 2.0]])
    neighbours = np.array([[1, 2], [0, 2], [0, 1], [0, 1]])
    out = ev.neighbour_label_distance(neighbours, labels, ["teff", "logg"])
    # teff per query: median(100, 400) = 250, median(100, 300) = 200, median(400, 300) = 350;
    # the fourth query has no teff -> skipped
    assert out["teff"] == pytest.approx(250.0)
    # logg: 0.75, 1.0, 1.25, 2.25 -> median 1.125
    assert out["logg"] == pytest.approx(1.125)


def test_round_trip_comparison_of_identical_and_shifted_rows():
    rng = np.random.default_rng(5)
    n = 400
    truth = np.column_stack(
        [rng.uniform(4000, 6000, n), rng.uniform(1, 5, n), rng.normal(0, 0.3, n), np.zeros(n)]
    )
    emb = unit_vectors(n, 16, seed=6)

    def outputs(shift: float) -> dict:
        labels = {}
        for j, label in enumerate(("teff", "logg", "fe_h", "alpha_m")):
            labels[label] = truth[:, j] + (shift if label == "teff" else 0.0)
            labels[f"{label}_err"] = np.full(n, 100.0 if label == "teff" else 0.1)
        return {"lrs_embedding": emb, "lrs_labels": labels}

    same = ev.compare_round_trip(outputs(0.0), outputs(0.0), truth)
    assert same["cosine"]["median"] == pytest.approx(1.0, abs=1e-6)
    assert same["teff_shift_over_sigma"]["median"] == 0.0
    moved = ev.compare_round_trip(outputs(0.0), outputs(30.0), truth)
    assert moved["teff_shift_over_sigma"]["median"] == pytest.approx(0.3)
    assert moved["labels"]["teff"]["bias_difference"] == pytest.approx(30.0)
    assert moved["labels"]["logg"]["bias_difference"] == pytest.approx(0.0)


def test_percentile_summary():
    values = np.concatenate([np.arange(101.0), [np.nan, np.inf]])
    s = ev.percentile_summary(values)
    assert s == {"n": 101, "median": 50.0, "p16": 16.0, "p84": 84.0}
    assert ev.percentile_summary(np.array([np.nan]))["n"] == 0


def test_anchor_verdicts_and_wins():
    assert ev.anchor_verdict(85.0, 90.0) == "pass"
    assert ev.anchor_verdict(0.2, 0.15) == "fail"
    assert ev.anchor_verdict(0.05, None) == "n/a"
    assert ev.anchor_verdict(float("nan"), 0.1) == "n/a"
    model = {"teff": 80.0, "logg": 0.2, "fe_h": 0.1, "alpha_m": float("nan")}
    baselines = {
        "a": {"teff": 100.0, "logg": 0.1, "fe_h": 0.2, "alpha_m": 0.05},
        "b": {"teff": 90.0, "logg": 0.3, "fe_h": 0.05, "alpha_m": 0.05},
    }
    assert ev.labels_beating_baselines(model, baselines) == ["teff"]


def test_enough_stars_are_simulated_for_the_test_split():
    assert ev.simulated_test_fraction() == pytest.approx(1 / 7)
    assert ev.n_to_simulate(10_000) < 1.06 * 10_000 * 7  # and not wastefully many
    for wanted in (100, 10_000):
        n = ev.n_to_simulate(wanted)
        p = ev.simulated_test_fraction()
        expected, sigma = n * p, math.sqrt(n * p * (1 - p))
        assert expected - 4.9 * sigma >= wanted


def test_format_table_aligns_columns():
    text = ev.format_table(["a", "bb"], [[1, 2.5], ["long", "x"]])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert ev.fmt(5123.4, "teff") == "5123" and ev.fmt(0.12345, "logg") == "0.123"
    assert ev.fmt(float("nan")) == "-"
    assert ev.fmt(-0.09, "teff") == "0" and ev.fmt(-0.0004, "logg") == "0.000"
    assert ev.verdict_text(0.15034, 0.15, "fe_h") == "fail: 0.1503 > 0.15"
    assert ev.verdict_text(85.2, 90.0, "teff") == "pass: 85 <= 90"
    assert ev.verdict_text(0.05, None, "alpha_m") == "n/a"


# --- baselines


def test_raw_xp_features_normalise_by_the_500_600_nm_mean():
    flux = np.full((2, 343), 3e-17)
    flux[1] *= 10
    features = ev.raw_xp_features(flux)
    assert features.shape == (2, 344) and features.dtype == np.float32
    np.testing.assert_allclose(features[:, :343], 1.0, rtol=1e-6)
    np.testing.assert_allclose(features[:, 343], np.log10([3e-17, 3e-16]), rtol=1e-5)


def test_masked_mse_skips_unknown_labels():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, float("nan")], [3.0, 2.0]])
    loss = ev.masked_mse(pred, target)
    assert loss.item() == pytest.approx((1.0 + 0.0 + 4.0) / 3)
    loss.backward()
    assert pred.grad[0, 1] == 0 and torch.isfinite(pred.grad).all()


def test_mlp_baseline_learns_a_linear_map_with_missing_labels():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((600, 5)).astype(np.float32)
    y = np.column_stack([x @ [1.0, -2.0, 0.5, 0.0, 0.0], 100 * x[:, 0] + 5000]).astype(np.float32)
    y[::3, 1] = np.nan
    predict = ev.fit_mlp_baseline(
        x[:400], y[:400], x[400:500], y[400:500], hidden=(32,), max_epochs=60, batch_size=64
    )
    predicted = predict(x[500:])
    assert np.all(np.isfinite(predicted))  # predicted where the label is unknown too
    resid = predicted - y[500:]
    assert np.nanstd(resid[:, 0]) < 0.25 * np.std(y[:, 0])
    assert np.nanstd(resid[:, 1]) < 0.25 * np.nanstd(y[:, 1])


def test_simulate_once_reuses_what_an_earlier_run_left(tmp_path, monkeypatch):
    calls = []

    def fake_simulate(out, **options):
        calls.append(options)
        out.mkdir(parents=True, exist_ok=True)
        made = {"n": options["n"], "seed": options["seed"]}
        (out / f"simulation-{options['release']}.json").write_text(json.dumps(made))
        return "simulated"

    monkeypatch.setattr(ev, "simulate_release", fake_simulate)
    options = dict(n=100, seed=7, release="X", anomaly_fraction=0.0)
    assert ev.simulate_once(tmp_path / "a", **options) == "simulated"
    assert ev.simulate_once(tmp_path / "a", **options).startswith("reused")
    assert ev.simulate_once(tmp_path / "a", **{**options, "n": 200}) == "simulated"
    assert len(calls) == 2
    # n = 0 with a real XP split: the record says how many stars that made
    real = dict(n=0, seed=8, release="R", anomaly_fraction=0.0, real_xp_split="test")
    (tmp_path / "r").mkdir()
    made = {"n": 4982, "seed": 8, "real_xp_split": "test"}
    (tmp_path / "r" / "simulation-R.json").write_text(json.dumps(made))
    assert ev.simulate_once(tmp_path / "r", **real).startswith("reused")
    assert ev.simulate_once(tmp_path / "r", **{**real, "real_xp_split": "val"}) == "simulated"
