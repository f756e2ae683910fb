"""Anomaly scores: the statistics, the calibration, the combination and the score stage."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats as scipy_stats

from specsearch.errors import SpecsearchError
from specsearch.files import write_parquet_atomic
from specsearch.indexes import build_store_indexes, extend_store_indexes
from specsearch.pipeline.calibration import TailModel, combine_logp
from specsearch.pipeline.embed import embed_store
from specsearch.pipeline.ingest import ingest
from specsearch.pipeline.residuals import fit_floor, residual_stats
from specsearch.pipeline.score import COMPONENTS, explain, score_store
from specsearch.query.sql import connect
from specsearch.schema import SCORES_SCHEMA
from specsearch.store import Store

from .conftest import synthetic_shard

# --- the tail calibration


@pytest.mark.parametrize(
    "sample, truth",
    [
        (lambda rng: rng.exponential(1.0, 40_000), lambda x: -np.log10(np.exp(-x))),
        (
            lambda rng: rng.chisquare(3, 40_000),
            lambda x: -np.log10(scipy_stats.chi2.sf(x, 3)),
        ),
        (lambda rng: rng.pareto(3.0, 40_000), lambda x: 3 * np.log10(1 + x)),
    ],
)
def test_tail_model_extrapolates_beyond_the_reference(sample, truth):
    values = sample(np.random.default_rng(1))
    tail = TailModel.fit(values)
    # in the body, the empirical tail; far beyond every reference value, within 15% of the law
    body = np.quantile(values, 0.5)
    assert tail.logp(np.array([body]))[0] == pytest.approx(np.log10(2), abs=0.01)
    far = np.quantile(values, 1 - 1e-4)
    got, want = tail.logp(np.array([far]))[0], truth(far)
    assert got == pytest.approx(want, rel=0.15)
    beyond = tail.logp(np.array([values.max(), 2 * values.max()]))
    assert beyond[1] > beyond[0] > 4  # rarer than every reference star: still ordered
    grid = np.linspace(0, far, 200)
    assert np.all(np.diff(tail.logp(grid)) >= 0)


def test_tail_model_of_a_contaminated_reference_still_flags_its_like():
    rng = np.random.default_rng(2)
    clean = rng.exponential(1.0, 19_600)
    values = np.concatenate([clean, 15 + rng.exponential(1.0, 400)])  # 2% anomalies
    tail = TailModel.fit(values)
    assert tail.logp(np.array([16.0]))[0] > 3.0  # an anomaly like the reference's own: p < 1e-3
    assert tail.logp(np.array([3.0]))[0] < 1.6


def test_tail_model_of_a_mostly_constant_statistic():
    values = np.zeros(1000)
    values[:30] = np.arange(1, 31) / 1462  # a few bad pixels in 3% of the stars
    tail = TailModel.fit(values)
    assert tail.logp(np.array([0.0]))[0] == 0.0
    assert tail.logp(np.array([0.1]))[0] > 5  # a tenth of the spectrum bad: very rare
    assert TailModel.fit(np.ones(5)) is None  # too few to calibrate


def test_combine_logp_is_a_valid_harmonic_mean():
    logp = np.array(
        [
            [6.0, np.nan, np.nan],  # one component: itself
            [6.0, 0.0, 0.0],  # one strong, two null: Bonferroni-like
            [2.0, 2.0, 2.0],  # three moderate ones add up no further than one of them
            [np.nan, np.nan, np.nan],
            [400.0, 1.0, 0.0],  # far beyond float64's smallest p: no overflow
        ]
    )
    out = combine_logp(logp)
    assert out[0] == pytest.approx(6.0)
    factor = max(2.0, np.e * np.log(3))
    assert out[1] == pytest.approx(np.log10((1e6 + 2) / 3) - np.log10(factor), abs=1e-9)
    assert out[2] == pytest.approx(2.0 - np.log10(factor), abs=1e-9)
    assert np.isnan(out[3])
    assert out[4] == pytest.approx(400 - np.log10(3) - np.log10(factor), abs=1e-6)
    # valid under the null: independent uniform p-values exceed the level at most that often
    rng = np.random.default_rng(3)
    null = combine_logp(-np.log10(rng.uniform(size=(200_000, 5))))
    assert (null >= 2).mean() <= 0.01 and (null >= 3).mean() <= 0.001


# --- residual statistics


def test_fit_floor_recovers_a_model_error():
    rng = np.random.default_rng(4)
    n, m = 4000, 50
    noise = np.full((n, m), 0.02)
    model_error = np.where(np.arange(m) < 25, 0.05, 0.0)  # the model is off on half the pixels
    predicted = np.ones((n, m))
    observed = predicted + rng.normal(0, 1, (n, m)) * np.sqrt(noise**2 + model_error**2)
    floor = fit_floor(observed, 1 / noise**2, predicted)
    np.testing.assert_allclose(floor[:25], 0.05, rtol=0.1)
    assert np.all(floor[25:] < 0.01)


def test_window_peak_finds_a_narrow_feature_the_mean_hides():
    rng = np.random.default_rng(5)
    m = 1462
    observed = 1 + 0.01 * rng.normal(size=(2, m))
    observed[1, 700:706] += 0.08  # a narrow emission line, +8 sigma over six pixels
    ivar = np.full((2, m), 1e4)
    stats = residual_stats(observed, ivar, np.ones((2, m)), np.zeros(m), (8, 32, 128), 32)
    assert stats.chi2[1] < 1.4  # the mean over 1462 pixels barely moves
    assert stats.peak[1] > 50 and stats.peak[0] < 6
    assert abs(stats.windows[1, 0] - 703) <= 16 and stats.window_mean[1, 0] > 0
    assert stats.windows[0, 0] == -1  # nothing worth naming in the plain spectrum
    assert stats.window_low[1, 0] <= 700 and stats.window_high[1, 0] >= 705


def test_a_broad_residual_is_one_flagged_range():
    rng = np.random.default_rng(6)
    m = 1462
    observed = 1 + 0.01 * rng.normal(size=(1, m))
    observed[0, 300:800] = 0.0  # a dead segment: 500 pixels of zero flux
    stats = residual_stats(observed, np.full((1, m), 1e4), np.ones((1, m)), np.zeros(m), (32,), 32)
    assert abs(stats.window_low[0, 0] - 300) <= 32 and abs(stats.window_high[0, 0] - 799) <= 32
    assert stats.window_mean[0, 0] < -50  # far less flux than predicted
    assert stats.windows[0, 1] == -1  # one range, not three windows inside it


# --- the stage on a small store


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("score")
    sources = {
        "DR1": synthetic_shard(300, 0, "DR1"),
        "DR2": synthetic_shard(200, 1, "DR2", first_id=10_000),
    }
    # DR2 again with 1000 unrelated stars added (ids far from the others)
    extra = synthetic_shard(1000, 2, "DR2B", first_id=50_000)
    import pyarrow as pa

    again = sources["DR2"].set_column(2, extra.schema.field("release"), pa.array(["DR2B"] * 200))
    sources["DR2B"] = pa.concat_tables([again, extra]).sort_by("source_id")
    store = root / "store"
    for release, table in sources.items():
        write_parquet_atomic(table, root / release / "part-00000.parquet")
        ingest(root / release, store, release, show_progress=False)
    embed_store(store, model=str(tiny_model), show_progress=False)
    build_store_indexes(store, show_progress=False)
    result = score_store(store, model=str(tiny_model), show_progress=False)
    return Store(store), result


def test_scores_follow_the_schema_and_rank_every_star(scored):
    store, result = scored
    assert result.calibrated and result.reference == "DR1"
    assert set(result.releases) == {"DR1", "DR2", "DR2B"}
    table = pq.read_table(store.score_path("DR2", "scores.parquet"))
    assert table.schema == SCORES_SCHEMA
    assert table.num_rows == 200
    assert sorted(table.column("rank").to_pylist()) == list(range(1, 201))
    rows = table.sort_by("rank").to_pylist()
    assert rows[0]["score"] >= rows[-1]["score"]
    assert all(r["modality_tag"] in ("lrs_only", "xp_only", "both", "pair") for r in rows)
    assert all(r["driver"] in COMPONENTS and r["explanation"] for r in rows)
    # a star without an LRS (every 10th) has no LRS component but still a score
    no_lrs = [r for r in rows if r["recon_lrs"] is None]
    assert no_lrs and all(r["score"] is not None and r["knn_xp"] is not None for r in no_lrs)
    graph = pq.read_table(store.score_path("DR2", "neighbors.parquet"))
    assert set(graph.column("rank").to_pylist()) == set(range(1, 11))
    assert not np.any(
        graph.column("source_id").to_numpy() == graph.column("neighbor_id").to_numpy()
    )


def test_adding_unrelated_stars_changes_no_other_stars_score(scored):
    store, _ = scored
    alone = pq.read_table(store.score_path("DR2", "scores.parquet")).to_pandas()
    crowded = pq.read_table(store.score_path("DR2B", "scores.parquet")).to_pandas()
    crowded = crowded[crowded.source_id.isin(alone.source_id)].sort_values("source_id")
    alone = alone.sort_values("source_id")
    assert len(crowded) == 200
    for column in ("score", *(f"{c}_logp" for c in COMPONENTS)):
        a, b = alone[column].to_numpy(float), crowded[column].to_numpy(float)
        # equal up to float32 rounding of batch-dependent matrix products
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert list(alone.sort_values("score").source_id) == list(
        crowded.sort_values("score").source_id
    )


def test_scoring_again_does_nothing_and_the_reference_stays_frozen(scored, tiny_model):
    store, _ = scored
    files = {p: p.stat().st_mtime_ns for p in (store.root / "scores").rglob("*") if p.is_file()}
    again = score_store(store, model=str(tiny_model), show_progress=False)
    assert not again.releases and set(again.skipped) == {"DR1", "DR2", "DR2B"}
    assert "nothing to do" in str(again)
    assert {p: p.stat().st_mtime_ns for p in files} == files
    with pytest.raises(SpecsearchError, match="calibrated on release DR1"):
        score_store(store, reference="DR2", model=str(tiny_model), show_progress=False)


def test_score_views_in_sql(scored):
    store, _ = scored
    con = connect(store)
    per_release = dict(
        con.execute("SELECT release, count(*) FROM scores_history GROUP BY 1").fetchall()
    )
    assert per_release == {"DR1": 300, "DR2": 200, "DR2B": 1200}
    # the current view holds each star once (DR2's stars again in DR2B: their DR2B rows)
    assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 300 + 1200
    assert con.execute("SELECT count(DISTINCT release) FROM neighbors").fetchone()[0] == 3


def test_explanations_name_the_driver_and_the_windows():
    n = 2
    stats = {c: np.array([1.0, 1.0]) for c in COMPONENTS}
    for c in ("recon_lrs", "cross_lrs", "recon_xp", "cross_xp"):
        stats[f"{c}_windows"] = np.array([[1121, -1, -1], [-1, -1, -1]], dtype=np.int32)
        stats[f"{c}_window_low"] = np.array([[1105, -1, -1], [-1, -1, -1]], dtype=np.int32)
        stats[f"{c}_window_high"] = np.array([[1136, -1, -1], [-1, -1, -1]], dtype=np.int32)
        stats[f"{c}_window_sigma"] = np.array([[12.0, np.nan, np.nan]] * n, dtype=np.float32)
        stats[f"{c}_window_mean"] = np.array([[-12.0, np.nan, np.nan]] * n, dtype=np.float32)
    logp = {c: np.array([0.1, 0.1]) for c in COMPONENTS}
    logp["recon_lrs"] = np.array([6.0, 0.2])
    explained = explain(stats, logp, np.array([5.0, 0.3]))
    assert explained["driver"] == ["recon_lrs", "recon_lrs"]
    assert explained["modality_tag"][0] == "lrs_only"
    # pixel 1121 of the LRS grid is at 5177 A: Mg b
    assert "Mg b at 5177 A (-12.0σ)" in explained["windows"][0]
    assert "nothing unusual" in explained["explanation"][1]


def test_extending_the_index_keeps_the_graph_current(scored):
    store, _ = scored
    extended = extend_store_indexes(store, "DR2B", show_progress=False)
    assert "nothing new" in str(extended)


def test_a_subsample_of_batches_decodes_only_its_stars(scored, tiny_model):
    """The floor fit's subsample (every k-th star of the release) gives the rows, stored
    outputs and predictions of the full pass, without decoding the other stars."""
    from specsearch.models.runner import SpecCLIPRunner
    from specsearch.pipeline.embed import plan_chunks
    from specsearch.pipeline.score import _batches, _read_batch

    store, _ = scored
    runner = SpecCLIPRunner(str(tiny_model), device="cpu")
    full = [_read_batch(store, chunk, runner) for chunk in plan_chunks(store, "DR2B")]
    every = 7
    sub = list(_batches(store, "DR2B", runner, False, "test", every=every))
    ids = np.concatenate([b.source_id for b in full])
    chosen = np.arange(len(ids)) % every == 0
    assert np.array_equal(np.concatenate([b.source_id for b in sub]), ids[chosen])
    assert sum(len(b.source_id) for b in sub) == -(-len(ids) // every)  # 1200 stars -> 172

    def joined(batches, part, key):
        values = np.concatenate([getattr(batch, part)[key] for batch in batches])
        return values[chosen] if batches is full else values

    for modality in ("lrs", "xp"):
        for part in ("has", "embedding"):
            np.testing.assert_array_equal(joined(full, part, modality), joined(sub, part, modality))
    for key in sub[0].predicted:
        np.testing.assert_allclose(
            joined(sub, "predicted", key), joined(full, "predicted", key), atol=1e-5, equal_nan=True
        )
