"""The FAISS layer: choice, recall tuning, persistence, extension, sharded builds, the store."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.errors import SpecsearchError
from specsearch.files import write_parquet_atomic
from specsearch.indexes import (
    GpuDevice,
    build_index,
    build_sharded_index,
    build_store_indexes,
    choose_factory,
    drop_self,
    empty_copy,
    extend_index,
    extend_store_indexes,
    index_ids,
    load_index,
    make_index,
    nlist_for,
    query_sets,
    recall_at_k,
    save_index,
    search_store,
    sphere_mixture,
    tune,
)
from specsearch.indexes.choose import candidate_factories, cost_growth, index_bytes
from specsearch.indexes.device import _clip_nprobe
from specsearch.indexes.io import rebuild_reason
from specsearch.indexes.make import GRAPH_EF_CONSTRUCTION
from specsearch.indexes.measure import (
    SLICES,
    graph_of,
    search_few,
    time_interleaved,
    tuning_queries,
)
from specsearch.store import Store

D = 32


@pytest.fixture(scope="module")
def clustered():
    """20k clustered unit vectors with sparse, shuffled ids (like Gaia source_ids)."""
    vectors = sphere_mixture(20_000, D, n_clusters=64, spread=0.6, seed=1)
    ids = np.random.default_rng(2).permutation(20_000).astype(np.int64) * 1_000_003 + 17
    return vectors, ids


@pytest.fixture(scope="module")
def auto_index(clustered):
    """The measured choice over the 20k vectors (exact search is left for fewer than 1,000)."""
    vectors, ids = clustered
    return build_index(vectors, ids, target_recall=0.95, exact_threshold=1_000, show_progress=False)


def exact_top_ids(vectors, ids, queries, k=10):
    similarity = queries @ vectors.T
    order = np.argsort(-similarity, axis=1)[:, :k]
    return ids[order]


def test_choice_follows_size_and_memory():
    assert choose_factory(10_000, 128) == "IDMap2,Flat"
    assert choose_factory(1_000_000, 128) == "IVF4096_HNSW32,SQ8"
    assert choose_factory(1_000_000, 128, gpu=True) == "IVF4096,SQ8"
    # 1M x (128 + 8) bytes does not fit 100 MB: product quantisation does
    assert choose_factory(1_000_000, 128, memory_budget_bytes=100_000_000).endswith(",PQ64")
    with pytest.raises(SpecsearchError):
        choose_factory(1_000_000, 128, memory_budget_bytes=1_000)


def test_a_larger_set_is_tuned_on_more_queries():
    # one per 250 vectors, from 1,000 (up to 250,000 vectors) to 4,000 (from a million)
    assert [tuning_queries(n) for n in (20_000, 250_000, 500_000, 1_000_000, 10**8)] == [
        1000,
        1000,
        2000,
        4000,
        4000,
    ]


def test_auto_reaches_target_recall_on_both_kinds_of_query(clustered, auto_index):
    vectors, ids = clustered
    index, params = auto_index
    assert params["auto"] and params["factory"] == params["choice"]["winner"] != "IDMap2,Flat"
    assert set(params["recalls"]) == {"self excluded", "held out"}
    assert min(params["recalls"].values()) == params["recall"] >= 0.95
    assert params["n_queries"] == {"self excluded": 1000, "held out": 1000}
    assert index.ntotal == 20_000  # the held-out stars were added after tuning
    knob, value = params["search_params"].split(",")[0].split("=")
    assert knob in ("nprobe", "efSearch") and 1 <= int(value) < 4096  # tuned, not exhaustive
    # an independent check: other stars of the index, self excluded, against numpy brute force
    rng = np.random.default_rng(99)
    rows = rng.choice(len(vectors), 300, replace=False)
    _, found = index.search(vectors[rows], 11)
    true = exact_top_ids(vectors, ids, vectors[rows], k=11)
    assert recall_at_k(drop_self(found, ids[rows], 10), drop_self(true, ids[rows], 10)) >= 0.93
    assert np.isin(found, ids).all()


def test_choice_records_candidates_and_why_the_winner_won(clustered, auto_index):
    vectors, _ = clustered
    _, params = auto_index
    choice = params["choice"]
    json.dumps(params)  # JSON-ready
    names = [c["factory"] for c in choice["candidates"]]
    assert names == candidate_factories(20_000, D, params["memory_budget_bytes"])
    assert choice["speed_for"] == "single" and choice["n"] == 20_000
    assert choice["sample_n"] == 19_000  # the whole set less the held-out queries
    by_name = {c["factory"]: c for c in choice["candidates"]}
    winner = by_name[choice["winner"]]
    assert winner["status"] == "winner" and choice["reason"].startswith(choice["winner"])
    assert "fastest one query at a time" in choice["reason"]
    assert {c["status"] for c in choice["candidates"]} <= {
        "winner",
        "finalist",
        "slower",
        "missed",
        "over budget",
    }
    for candidate in choice["candidates"]:
        assert candidate["bytes"] == index_bytes(candidate["factory"], 20_000, D)
        if candidate["status"] == "over budget":
            assert "curve" not in candidate
            continue
        if candidate["reached"]:  # every kind of query reached the target, less one std. error
            point = next(
                p for p in candidate["curve"] if p["search_params"] == candidate["search_params"]
            )
            for kind, recall in point["recall"].items():
                assert recall - point["recall_se"][kind] >= 0.95 - 1e-9
        else:
            assert candidate["status"] in ("slower", "missed") and candidate["stopped"]
    # the winner is the fastest of the finalists, timed side by side on the whole set
    finalists = [by_name[name] for name in choice["finalists"]]
    assert winner in finalists
    assert all(winner["final"]["single_ms"] <= f["final"]["single_ms"] for f in finalists)
    assert params["search_params"] == winner["search_params"]


def test_choice_keeps_to_the_memory_budget(clustered):
    vectors, ids = clustered
    n, sample = 5000, slice(0, 5000)
    ivf_sq8 = f"IVF{nlist_for(n)}_HNSW32,SQ8"
    budget = index_bytes(ivf_sq8, n, D) + 1000
    assert index_bytes("HNSW8,SQfp16", n, D) > budget  # no graph fits
    _, params = build_index(
        vectors[sample],
        ids[sample],
        memory_budget_bytes=budget,
        exact_threshold=0,
        show_progress=False,
    )
    choice = params["choice"]
    assert params["factory"] == ivf_sq8 and choice["winner"] == ivf_sq8
    statuses = {c["factory"]: c["status"] for c in choice["candidates"]}
    assert statuses.pop(ivf_sq8) == "winner"
    assert set(statuses.values()) == {"over budget"}
    assert "over budget: HNSW8,SQfp16" in choice["reason"]
    # where SQ8 does not fit either, the finest product quantiser that does
    budget = index_bytes(f"IVF{nlist_for(n)}_HNSW32,PQ8", n, D) + 1000
    _, params = build_index(
        vectors[sample],
        ids[sample],
        memory_budget_bytes=budget,
        exact_threshold=0,
        show_progress=False,
    )
    assert params["factory"].endswith(",PQ8")
    assert params["index_bytes_estimate"] <= budget
    with pytest.raises(SpecsearchError, match="do not fit"):
        build_index(vectors[sample], ids[sample], memory_budget_bytes=1000, exact_threshold=0)


def test_choice_for_a_batch(clustered):
    vectors, ids = clustered
    _, params = build_index(
        vectors[:6000], ids[:6000], exact_threshold=0, speed_for="batch", show_progress=False
    )
    choice = params["choice"]
    assert choice["speed_for"] == "batch" and "single_winner" in choice
    assert "fastest in a batch" in choice["reason"]
    finalists = [c for c in choice["candidates"] if c["factory"] in choice["finalists"]]
    best = max(f["final"]["batch_qps"] for f in finalists)
    winner = next(c for c in finalists if c["factory"] == choice["winner"])
    assert winner["final"]["batch_qps"] == best
    with pytest.raises(SpecsearchError, match="speed_for"):
        build_index(vectors[:6000], ids[:6000], exact_threshold=0, speed_for="fast")


def test_tuning_asks_every_kind_of_query(clustered):
    """A graph finds its own nodes' neighbours more easily than a new vector's: with the
    held-out queries the knob must go at least as high, and both reach the target."""
    vectors, ids = clustered
    index = make_index("HNSW8,SQfp16", D)
    index.train(vectors[:15_000])
    index.add_with_ids(vectors[:15_000], ids[:15_000])
    rows = np.arange(0, 15_000, 15)
    both = query_sets(vectors[:15_000], ids[:15_000], rows, vectors[15_000:16_000], 10)
    assert [s.kind for s in both] == ["self excluded", "held out"]
    alone = tune(index, both[:1], 0.95, 10)
    together = tune(index, both, 0.95, 10)
    value = int(together.search_params.split("=")[1])
    assert value >= int(alone.search_params.split("=")[1])
    assert together.reached and set(together.recalls) == {"self excluded", "held out"}
    chosen = next(p for p in together.curve if p["search_params"] == together.search_params)
    for kind, recall in chosen["recall"].items():
        assert recall - chosen["recall_se"][kind] >= 0.95
    # the value below the chosen one, where measured, missed on some kind
    below = [p for p in together.curve if int(p["search_params"].split("=")[1]) < value]
    assert below and not any(p["reached"] for p in below)


def test_cost_growth_and_graph_sizes(clustered):
    assert cost_growth("IDMap2,Flat", 1000, 4000) == 4.0
    assert cost_growth("IVF64_HNSW32,SQ8", 1000, 4000) == 2.0
    assert cost_growth("HNSW16,SQfp16", 1000, 1_000_000) == pytest.approx(2.0)
    assert cost_growth("HNSW16,Flat", 5000, 5000) == 1.0
    vectors, ids = clustered
    for factory in ("HNSW8,SQfp16", "HNSW16,Flat", "HNSW32,SQ8"):
        index = make_index(factory, D)
        index.train(vectors[:5000])
        index.add_with_ids(vectors[:5000], ids[:5000])
        saved = len(faiss.serialize_index(index))
        assert abs(index_bytes(factory, 5000, D) - saved) < 0.05 * saved, factory


def test_leave_one_out_tuning_holds_for_stars_not_indexed(clustered):
    vectors, ids = clustered
    indexed, held_out = slice(0, 18_000), slice(18_000, 20_000)
    index, params = build_index(
        vectors[indexed], ids[indexed], exact_threshold=1_000, show_progress=False
    )
    assert params["recall"] >= 0.95 and "self excluded" in params["recall_queries"]
    _, found = index.search(vectors[held_out], 10)
    assert (
        recall_at_k(found, exact_top_ids(vectors[indexed], ids[indexed], vectors[held_out])) >= 0.94
    )


def test_recall_and_drop_self():
    true = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(np.array([[3, 2, 1], [4, -1, 9]]), true) == pytest.approx((1 + 1 / 3) / 2)
    found = np.array([[7, 1, 2, 3], [4, 5, 6, 8]])
    np.testing.assert_array_equal(drop_self(found, np.array([7, 99]), 3), [[1, 2, 3], [4, 5, 6]])


def test_small_set_is_exact(clustered):
    vectors, ids = clustered
    index, params = build_index(vectors[:2000], ids[:2000], show_progress=False)
    assert params["factory"] == "IDMap2,Flat"
    assert params["recall"] == 1.0
    similarities, found = index.search(vectors[:5], 3)
    assert (found[:, 0] == ids[:5]).all()
    np.testing.assert_allclose(similarities[:, 0], 1.0, atol=1e-5)


def test_forced_factory_is_honoured(clustered):
    vectors, ids = clustered
    index, params = build_index(
        vectors[:5000], ids[:5000], factory="IVF32,Flat", exclude_self=False, show_progress=False
    )
    assert "self included" in params["recall_queries"]
    assert isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat)
    assert faiss.extract_index_ivf(index).nlist == 32
    assert params["factory"] == "IVF32,Flat" and params["auto"] is False
    assert 0.95 <= params["recall"] <= 1.0
    index, params = build_index(vectors[:3000], ids[:3000], factory="HNSW16", show_progress=False)
    assert isinstance(faiss.downcast_index(faiss.downcast_index(index).index), faiss.IndexHNSWFlat)
    assert params["search_params"].startswith("efSearch=") and params["recall"] >= 0.95
    _, found = index.search(vectors[:3], 1)
    assert (found[:, 0] == ids[:3]).all()
    with pytest.raises(SpecsearchError, match="factory"):
        build_index(vectors[:100], ids[:100], factory="NoSuchIndex", show_progress=False)


def test_bad_input_is_refused(clustered):
    vectors, ids = clustered
    with pytest.raises(SpecsearchError, match="duplicate id"):
        build_index(vectors[:10], np.zeros(10, np.int64), show_progress=False)
    broken = vectors[:10].copy()
    broken[3] = np.nan
    with pytest.raises(SpecsearchError, match=str(ids[3])):
        build_index(broken, ids[:10], show_progress=False)


def test_search_few_equals_search_and_leaves_the_thread_count(clustered, auto_index):
    vectors, ids = clustered
    index, _ = auto_index
    threads = faiss.omp_get_max_threads()
    for rows in (slice(0, 1), slice(5, 12)):
        expected = index.search(vectors[rows], 10)
        got = search_few(index, vectors[rows], 10)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_allclose(got[0], expected[0])
        assert got[1].dtype == np.int64 and got[0].dtype == np.float32
        assert set(got[1][0]) <= set(ids) and got[1][0, 0] == ids[rows.start]
    assert faiss.omp_get_max_threads() == threads
    with pytest.raises(ValueError, match="d=32"):
        search_few(index, vectors[:1, :16], 10)
    assert faiss.omp_get_max_threads() == threads


def test_interleaved_timing_takes_turns_and_cuts_slow_searches_short():
    import time

    calls = []

    def searcher(name, batch_s, one_s):
        def batch(queries, k):
            calls.append((name, "batch", len(queries)))
            time.sleep(batch_s)

        def one(query, k):
            assert query.shape == (1, 4) and k == 10
            calls.append((name, "one", 1))
            time.sleep(one_s)

        return batch, one

    queries = np.ones((400, 4), np.float32)
    speeds = time_interleaved(
        {"fast": searcher("fast", 0.002, 0.0), "slow": searcher("slow", 0.0, 0.011)},
        queries,
        10,
        rounds=2,
        singles=200,
    )
    timed = calls[4:]  # after the warm-up: one batch and one query each
    batches = [(name, n) for name, kind, n in timed if kind == "batch"]
    assert len(batches) == 2 * 2 * SLICES and {n for _, n in batches} == {40}
    for turn in range(0, len(batches), 2):  # both have a turn in every slice
        assert {name for name, _ in batches[turn : turn + 2]} == {"fast", "slow"}
    ones = [name for name, kind, _ in timed if kind == "one"]
    assert ones.count("fast") == 2 * 200  # every query of --single
    assert ones.count("slow") == 2 * SLICES * 5  # five a slice: 55 ms > 50 ms
    # 400 queries in 10 calls of 2 ms: at most 20,000 QPS, and sleep overshoots little
    assert 12_000 < speeds["fast"]["batch_qps"] <= 20_000
    assert 11.0 <= speeds["slow"]["single_ms"] < 16.0
    assert speeds["fast"]["single_ms"] < 1.0 and len(speeds["slow"]["single_ms_rounds"]) == 2


def test_save_load_round_trip(tmp_path, clustered, auto_index):
    vectors, _ = clustered
    index, params = auto_index
    saved = save_index(index, {**params, "model_id": "m1"}, tmp_path, "xp")
    written = json.loads((tmp_path / "xp.json").read_text())
    assert written["recall"] == params["recall"] >= 0.95
    assert written["factory"] == params["factory"] and written["n"] == 20_000 and written["d"] == D
    assert written["version"] == saved["version"] and written["model_id"] == "m1"
    expected = index.search(vectors[:50], 10)
    for mmap in (False, True):
        loaded, loaded_params = load_index(tmp_path, "xp", mmap=mmap)
        assert loaded_params == written
        got = loaded.search(vectors[:50], 10)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_allclose(got[0], expected[0])


def test_index_never_pairs_with_other_json(tmp_path, clustered):
    vectors, ids = clustered
    index, params = build_index(vectors[:500], ids[:500], show_progress=False)
    save_index(index, params, tmp_path, "lrs")
    stale = json.loads((tmp_path / "lrs.json").read_text())
    save_index(index, params, tmp_path, "lrs")  # a new version of the index ...
    (tmp_path / "lrs.json").write_text(json.dumps(stale))  # ... beside the old JSON
    with pytest.raises(SpecsearchError, match="does not match"):
        load_index(tmp_path, "lrs", attempts=2)


def test_extension_adds_new_release_once(tmp_path, clustered):
    vectors, ids = clustered
    index, params = build_index(vectors[:3000], ids[:3000], show_progress=False)
    save_index(index, {**params, "releases": ["DR1"]}, tmp_path, "xp")
    new = slice(2500, 4000)  # 500 stars seen before, 1000 new
    grown = extend_index(tmp_path, "xp", vectors[new], ids[new], releases=["DR2"])
    assert grown["added"] == 1000 and grown["n"] == 4000 and grown["releases"] == ["DR1", "DR2"]
    assert grown["recall"] == 1.0
    held = index_ids(load_index(tmp_path, "xp")[0])
    assert len(held) == len(set(held)) == 4000
    assert set(held) == set(ids[:4000])
    again = extend_index(tmp_path, "xp", vectors[new], ids[new], releases=["DR2"])
    assert again["added"] == 0 and again["version"] == grown["version"]
    assert len(index_ids(load_index(tmp_path, "xp")[0])) == 4000


def test_extension_of_ivf_and_rebuild_when_outgrown(tmp_path, clustered):
    vectors, ids = clustered
    index, params = build_index(
        vectors[:8000], ids[:8000], factory="IVF64,SQ8", show_progress=False
    )
    save_index(index, params, tmp_path, "xp")
    grown = extend_index(tmp_path, "xp", vectors[8000:10000], ids[8000:10000])
    assert grown["n"] == 10_000 and grown["factory"] == "IVF64,SQ8" and grown["recall"] >= 0.95
    assert set(index_ids(load_index(tmp_path, "xp")[0])) == set(ids[:10000])
    # an auto Flat index that grows past the exact threshold becomes the measured choice
    flat, flat_params = build_index(
        vectors[:2000], ids[:2000], exact_threshold=3000, show_progress=False
    )
    save_index(flat, flat_params, tmp_path, "lrs")
    rebuilt = extend_index(tmp_path, "lrs", vectors[2000:4000], ids[2000:4000])
    assert rebuilt["factory"] == rebuilt["choice"]["winner"] != "IDMap2,Flat"
    assert "approximate index" in rebuilt["rebuilt"] and rebuilt["n"] == 4000
    assert set(index_ids(load_index(tmp_path, "lrs")[0])) == set(ids[:4000])


def test_graph_grows_in_place_and_is_rebuilt_to_replace_vectors(tmp_path, clustered):
    vectors, ids = clustered
    index, params = build_index(
        vectors[:6000], ids[:6000], factory="HNSW16,SQfp16", show_progress=False
    )
    save_index(index, params, tmp_path, "xp")
    # linked with the wider construction search, which the file keeps for the vectors added later
    assert params["ef_construction"] == GRAPH_EF_CONSTRUCTION == 80
    assert graph_of(load_index(tmp_path, "xp")[0]).hnsw.efConstruction == 80
    grown = extend_index(tmp_path, "xp", vectors[6000:8000], ids[6000:8000])
    assert "rebuilt" not in grown and grown["factory"] == "HNSW16,SQfp16"
    assert grown["n"] == 8000 and grown["added"] == 2000
    # re-tuned on stars of the index and on 1000 of the new ones, held out until then
    assert grown["n_queries"] == {"self excluded": 1000, "held out": 1000}
    assert min(grown["recalls"].values()) >= 0.95
    held = index_ids(load_index(tmp_path, "xp")[0])
    assert len(held) == len(set(held)) == 8000 and set(held) == set(ids[:8000])
    # a re-observed star's vector changes: a graph cannot remove the old one, so it is rebuilt
    moved = vectors[10_000:10_500]  # other stars' vectors, under the ids of 500 indexed ones

    def database():
        return iter([(np.concatenate([moved, vectors[500:8000]]), ids[:8000])])

    replaced = extend_index(
        tmp_path, "xp", moved, ids[:500], database=database, replace_existing=True
    )
    assert replaced["replaced"] == 500 and replaced["n"] == 8000
    assert "cannot replace vectors in place" in replaced["rebuilt"]
    index, _ = load_index(tmp_path, "xp")
    _, found = index.search(moved[:50], 1)
    assert (found[:, 0] == ids[:50]).all()  # the new vectors, under their ids


def test_auto_index_is_chosen_again_when_the_set_outgrows_it():
    params = {
        "factory": "HNSW16,SQfp16",
        "auto": True,
        "d": D,
        "memory_budget_bytes": 1 << 30,
        "choice": {"n": 10_000},
    }
    assert rebuild_reason(params, 39_000) is None  # a graph grows in place ...
    assert "4.0x the 10,000 chosen for" in rebuild_reason(params, 40_000)  # ... for a while
    assert "no longer fit" in rebuild_reason({**params, "memory_budget_bytes": 1000}, 20_000)
    assert rebuild_reason({**params, "auto": False}, 10**6) is None  # as the user asked
    assert "cannot grow" in rebuild_reason({**params, "factory": "PQ16"}, 11_000)


def test_sharded_build_equals_single_build(tmp_path, clustered):
    vectors, ids = clustered
    trained = make_index("IVF128,SQ8", D)
    trained.train(vectors[::2])
    single = empty_copy(trained)
    single.add_with_ids(vectors, ids)
    shards = [(vectors[i : i + 5000], ids[i : i + 5000]) for i in range(0, 20_000, 5000)]
    sharded = build_sharded_index(trained, shards, tmp_path, "xp.test.ivfdata", show_progress=False)
    assert sharded.ntotal == 20_000 and (tmp_path / "xp.test.ivfdata").exists()
    assert not list(tmp_path.glob(".*shards*"))  # scratch removed
    for index in (single, sharded):
        faiss.extract_index_ivf(index).nprobe = 8
    queries = vectors[::97]
    expected, got = single.search(queries, 10), sharded.search(queries, 10)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    # the saved on-disk index travels with its folder
    save_index(sharded, {"ivfdata": "xp.test.ivfdata", "search_params": "nprobe=8"}, tmp_path, "xp")
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)
    shutil.rmtree(tmp_path)
    loaded, _ = load_index(moved, "xp")
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], expected[1])


def test_shards_added_by_parallel_processes_give_the_same_index(tmp_path, clustered):
    vectors, ids = clustered
    trained = make_index("IVF128,SQ8", D)
    trained.train(vectors[::2])
    batches = [(vectors[i : i + 1500], ids[i : i + 1500]) for i in range(0, 20_000, 1500)]
    one = build_sharded_index(
        trained, batches, tmp_path / "one", "a.ivfdata", shard_size=4000, show_progress=False
    )
    two = build_sharded_index(
        trained,
        iter(batches),
        tmp_path / "two",
        "b.ivfdata",
        shard_size=4000,
        show_progress=False,
        workers=2,
    )
    assert one.ntotal == two.ntotal == 20_000
    assert not list((tmp_path / "two").glob(".*shards*"))  # scratch, trained copy included
    for index in (one, two):
        faiss.extract_index_ivf(index).nprobe = 8
    queries = vectors[::53]
    np.testing.assert_array_equal(two.search(queries, 10)[1], one.search(queries, 10)[1])
    np.testing.assert_array_equal(two.search(queries, 10)[0], one.search(queries, 10)[0])


def test_index_build_cli_sharded_with_workers(tmp_path, clustered):
    vectors, ids = clustered
    store = Store(tmp_path / "store")
    write_embeddings(store, "DR1", "xp", vectors[:12_000], ids[:12_000], parts=4)
    result = CliRunner().invoke(
        app,
        ["index", "build", "--store", str(store.root), "--sharded", "--workers", "2"],
    )
    assert result.exit_code == 0, result.output
    params = json.loads((store.index_dir() / "xp.json").read_text())
    # small enough for memory, but built as asked: sharded, by 2 processes, lists on disk
    assert params["ondisk"] and params["workers"] == 2 and params["n"] == 12_000
    assert (store.index_dir() / params["ivfdata"]).exists() and params["recall"] >= 0.95
    _, found = search_store(store, vectors[100:110], "xp", k=1)
    assert (found[:, 0] == ids[100:110]).all()
    bad = CliRunner().invoke(
        app, ["index", "build", "--store", str(store.root), "--sharded", "--workers", "0"]
    )
    assert bad.exit_code == 2 and "at least 1" in bad.output


def test_merged_ondisk_lists_take_more_vectors(tmp_path, clustered):
    """Vectors added to merged on-disk lists (as an extension does) land beside the merged ones,
    not over them."""
    vectors, ids = clustered
    trained = make_index("IVF64,SQ8", D)
    trained.train(vectors[::2])
    shards = [(vectors[:5000], ids[:5000]), (vectors[5000:11_000], ids[5000:11_000])]
    merged = build_sharded_index(trained, shards, tmp_path, "xp.ivfdata", show_progress=False)
    merged.add_with_ids(vectors[11_000:12_000], ids[11_000:12_000])  # every list grows
    held = index_ids(merged)
    assert len(held) == len(set(held)) == 12_000 and set(held) == set(ids[:12_000])
    faiss.extract_index_ivf(merged).nprobe = 64
    _, found = merged.search(vectors[:12_000:50], 1)
    assert (found[:, 0] == ids[:12_000:50]).all()


class FakeGpu(GpuDevice):
    """The GPU branch with copies standing in for the transfers."""

    def __init__(self):
        super().__init__()
        self.moves = []

    def _cpu_to_gpu(self, index):
        if isinstance(
            faiss.downcast_index(faiss.extract_index_ivf(index).quantizer), faiss.IndexHNSW
        ):
            raise RuntimeError("HNSW quantiser has no GPU kernels")
        self.moves.append("to_gpu")
        return faiss.clone_index(index)

    def _gpu_to_cpu(self, index):
        self.moves.append("to_cpu")
        return faiss.clone_index(index)

    def knn(self, queries, embeddings, k):
        self.moves.append("knn")
        return faiss.knn(queries, embeddings, k, metric=faiss.METRIC_INNER_PRODUCT)

    def clustering_index(self, d):
        self.moves.append("clustering")
        return faiss.IndexFlatIP(d)

    def _set_gpu_params(self, index, search_params):
        faiss.ParameterSpace().set_index_parameters(index, search_params)


def test_gpu_branch(clustered):
    vectors, ids = clustered
    device = FakeGpu()
    index, params = build_index(
        vectors, ids, exact_threshold=1000, device=device, show_progress=False
    )
    assert (
        params["device"] == "cuda"
        and params["factory"].startswith("IVF")
        and "HNSW" not in params["factory"]
    )
    # exact neighbours of both kinds of query, then the index goes there and comes back
    assert device.moves[:3] == ["knn", "knn", "to_gpu"] and device.moves[-1] == "to_cpu"
    assert params["recall"] >= 0.95
    assert not device._moved  # everything that went to the device came back
    # a type without GPU kernels is built on the CPU, with k-means assignment on the device
    device = FakeGpu()
    index, params = build_index(
        vectors[:5000], ids[:5000], factory="IVF32_HNSW16,SQ8", device=device, show_progress=False
    )
    assert "to_gpu" not in device.moves and "clustering" in device.moves
    assert faiss.extract_index_ivf(index).clustering_index is None
    # GPU kernels take at most 2048 probes and have no HNSW quantiser to set
    assert _clip_nprobe("nprobe=4096,quantizer_efSearch=8192") == "nprobe=2048"


# --- the store


def write_embeddings(
    store: Store, release: str, modality: str, vectors, ids, model_id="test-model", parts=2
):
    """Embedding Parquet as the embed stage writes it (float16 unit vectors + extra columns),
    committed to the store (a release without shards gets an empty one)."""
    if release not in store.releases():
        store.write_release(release, [])
    half = vectors.astype(np.float16)
    for number, rows in enumerate(np.array_split(np.arange(len(ids)), parts)):
        table = pa.table(
            {
                "source_id": pa.array(ids[rows], pa.int64()),
                "modality": pa.array([modality] * len(rows)),
                "model_id": pa.array([model_id] * len(rows)),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(half[rows].ravel()), vectors.shape[1]
                ),
                "cross_chi2": pa.array(np.ones(len(rows), np.float32)),
            }
        )
        write_parquet_atomic(
            table, store.embedding_path(release, modality, f"part-{number:05d}.parquet")
        )
    store.record_embeddings(model_id)


def store_ids(store: Store, modality: str) -> set[int]:
    return set(store.embeddings(modality, columns=["source_id"]).column(0).to_pylist())


def test_store_round_trip(tmp_path, clustered):
    vectors, ids = clustered
    store = Store(tmp_path / "store")
    write_embeddings(store, "DR1", "xp", vectors[:6000], ids[:6000])
    write_embeddings(store, "DR2", "xp", vectors[5000:9000], ids[5000:9000])  # 1000 re-observed
    write_embeddings(store, "DR1", "lrs", vectors[:800], ids[:800])
    summary = build_store_indexes(store, exact_threshold=5000, show_progress=False)
    assert (
        "\n" not in str(summary)
        and "xp: 9,000 vectors" in str(summary)
        and "lrs: 800 vectors" in str(summary)
    )
    params = json.loads((store.index_dir() / "xp.json").read_text())
    assert params["model_id"] == "test-model" and params["releases"] == ["DR1", "DR2"]
    assert params["factory"] == params["choice"]["winner"] and params["recall"] >= 0.95
    assert store.read_manifest()["indexes"]["xp"]["version"] == params["version"]
    for modality in ("xp", "lrs"):
        rng = np.random.default_rng(5)
        queries = rng.standard_normal((200, D)).astype(np.float32)
        similarities, found = search_store(store, queries, modality, k=10)
        assert found.shape == (200, 10) and np.isfinite(similarities).all()
        assert set(found.ravel().tolist()) <= store_ids(store, modality)
        assert (np.diff(similarities, axis=1) <= 1e-6).all()  # best first
    _, found = search_store(store.root, vectors[7000], "xp", k=1)
    assert found[0, 0] == ids[7000]
    _, found = search_store(store, vectors[:2], "lrs", k=1000)  # more than the 800 there are
    assert (found[:, 800:] == -1).all() and (found[:, :800] >= 0).all()


def test_store_sharded_build_and_nightly_extension(tmp_path, clustered):
    vectors, ids = clustered
    store = Store(tmp_path / "store")
    write_embeddings(store, "DR1", "xp", vectors[:12_000], ids[:12_000], parts=4)
    summary = build_store_indexes(store, "xp", memory_budget_bytes=1_000_000, show_progress=False)
    params = json.loads((store.index_dir() / "xp.json").read_text())
    assert params["ondisk"] and (store.index_dir() / params["ivfdata"]).exists()
    assert params["recall"] >= 0.95 and "12,000 vectors" in str(summary)
    write_embeddings(store, "DR2", "xp", vectors[11_000:14_000], ids[11_000:14_000])
    summary = extend_store_indexes(store, "DR2", "xp", show_progress=False)
    grown = json.loads((store.index_dir() / "xp.json").read_text())
    assert grown["n"] == 14_000 and grown["added"] == 2000 and grown["releases"] == ["DR1", "DR2"]
    assert grown["replaced"] == 1000  # the re-observed stars now hold their DR2 vectors
    assert (
        grown["ivfdata"] != params["ivfdata"]
        and not (store.index_dir() / params["ivfdata"]).exists()
    )
    assert grown["recall"] >= 0.95
    _, found = search_store(store, vectors[13_500:13_510], "xp", k=10)
    assert (found[:, 0] == ids[13_500:13_510]).all()
    assert set(found.ravel().tolist()) <= store_ids(store, "xp")
    assert "nothing new" in str(extend_store_indexes(store, "DR2", "xp", show_progress=False))


def test_index_build_cli(tmp_path, clustered):
    vectors, ids = clustered
    store = Store(tmp_path / "store")
    write_embeddings(store, "DR1", "xp", vectors[:1000], ids[:1000])
    result = CliRunner().invoke(
        app, ["index", "build", "--store", str(store.root), "--modality", "xp"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("\n") == 1 and "IDMap2,Flat" in result.output
    result = CliRunner().invoke(
        app, ["index", "build", "--store", str(store.root), "--modality", "lrs"]
    )
    assert result.exit_code == 2 and "no lrs embeddings" in result.output
    result = CliRunner().invoke(app, ["index", "build", "--store", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a specsearch store" in result.output
