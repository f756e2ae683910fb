"""Which FAISS index to build for n unit vectors of dimension d: the measured frontier.

``choose_index`` (the CPU's "auto") builds a small set of candidates, measures the recall and
speed of each at the search setting that reaches the target recall, and keeps the fastest within
the memory budget:

- graphs (HNSW) with and without scalar quantisation: ``HNSW{8,16,32},SQfp16``, ``HNSW16,Flat``,
  ``HNSW16,SQ8``;
- inverted files with an HNSW coarse quantiser and ``nlist ~ 4 sqrt(n)`` lists (and half as
  many for SQfp16), with ``SQfp16`` and ``SQ8`` codes, or the finest ``PQ`` that fits when SQ8
  does not;
- exact search, ``IDMap2,Flat``.

Recall is measured on two kinds of query (``measure.QuerySet``): stars of the index, self
excluded (search by star, the kNN graph) and stars not in it (a spectrum file, the other
modality, the next release). Speed is that of one query at a time (a user's search, the default)
or of a batch (a kNN graph of millions), as asked. Candidates are first measured on a sample of
at most SAMPLE vectors; when that is less than the set, the fastest (FINALISTS) are built on the
whole set and timed there, side by side. The candidates, their curves and the reason the winner
won go into the index JSON.

Below ``exact_threshold`` vectors exact search is chosen without measuring: it is exact and
fast enough there. ``choose_factory`` is the rule used where nothing is measured: the GPU (which
has no HNSW) and builds too large for memory, whose inverted lists live on disk; ``code_ladder``
lists the finer codes such a build may step up to.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np

from specsearch.errors import SpecsearchError

from .make import Made, make
from .measure import QuerySet, Tuning, query_sets, time_side_by_side, tune

DEFAULT_TARGET_RECALL = 0.95
"""Recall@10 that ``auto`` tunes an index to, unless told otherwise."""

EXACT_THRESHOLD = 50_000
"""Below this many vectors ``auto`` builds an exact index: brute force is fast enough there."""

MIN_POINTS_PER_LIST = 39
"""FAISS warns when k-means has fewer training points than this per centroid."""

IVF_CODES = ("SQ8", "SQfp16", "Flat")
"""Inverted-list codes from coarsest to finest that ``auto`` may use (PQ comes before these)."""

_IVF_RE = re.compile(r"IVF(\d+)")
_HNSW_RE = re.compile(r"^HNSW(\d+)(?:,(\w+))?$")

ID_BYTES = 8
"""An id held beside each vector (inverted lists, or the IDMap wrapper)."""


def default_memory_budget() -> int:
    """Half of the machine's physical memory, in bytes."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest machine
        return 4 << 30


def nlist_for(n: int) -> int:
    """Number of inverted lists for n vectors: the power of two nearest 4 sqrt(n).

    Capped so that k-means sees at least MIN_POINTS_PER_LIST training points per list.
    """
    target = 4.0 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(target))
    while nlist > 1 and nlist * MIN_POINTS_PER_LIST > n:
        nlist //= 2
    return max(nlist, 1)


def code_bytes(code: str, d: int) -> int:
    """Bytes a vector's code takes in an inverted list (without its 8-byte id)."""
    if code == "Flat":
        return 4 * d
    if code == "SQfp16":
        return 2 * d
    if code == "SQ8":
        return d
    match = re.fullmatch(r"PQ(\d+)(?:x(\d+))?", code)
    if match:
        return math.ceil(int(match.group(1)) * int(match.group(2) or 8) / 8)
    raise ValueError(f"unknown code {code!r}")


def index_bytes(factory: str, n: int, d: int) -> int:
    """Estimated memory of an index built by ``factory`` over n vectors (codes, ids, links, lists).

    A graph ``HNSW{M}`` holds 2M neighbour links (4 bytes each) a vector on its base level and
    M on each upper level, which a vector reaches with probability 1/M (so M / (M - 1) more),
    plus 12 bytes of offsets and levels.
    """
    if factory in ("IDMap2,Flat", "IDMap,Flat", "Flat"):
        return n * (4 * d + ID_BYTES)
    graph = _HNSW_RE.match(factory)
    if graph:
        m = int(graph.group(1))
        links = 4 * (2 * m + m / (m - 1)) + 12 if m > 1 else 20
        return int(n * (code_bytes(graph.group(2) or "Flat", d) + links + ID_BYTES))
    match = _IVF_RE.search(factory)
    if not match:
        return n * (4 * d + ID_BYTES)  # unknown structure: assume raw vectors
    nlist = int(match.group(1))
    code = factory.rsplit(",", 1)[-1]
    quantizer = nlist * 4 * d * (2 if "HNSW" in factory else 1)
    return n * (code_bytes(code, d) + ID_BYTES) + quantizer


def _pq_codes(d: int) -> list[str]:
    """PQ codes from the finest to the coarsest whose sub-vectors are at least 2 dimensions."""
    return [f"PQ{m}" for m in range(d // 2, 0, -1) if d % m == 0 and m in _PQ_SIZES]


# sub-quantiser counts FAISS (and its GPU kernels) handle well
_PQ_SIZES = {1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 48, 56, 64, 96, 128, 192, 256}


def choose_factory(
    n: int,
    d: int,
    memory_budget_bytes: int | None = None,
    exact_threshold: int = EXACT_THRESHOLD,
    gpu: bool = False,
) -> str:
    """The FAISS factory string that ``auto`` builds for n vectors of dimension d."""
    budget = memory_budget_bytes or default_memory_budget()
    if n < exact_threshold and index_bytes("IDMap2,Flat", n, d) <= budget:
        return "IDMap2,Flat"
    nlist = nlist_for(n)
    coarse = f"IVF{nlist}" if gpu else f"IVF{nlist}_HNSW32"
    for code in ["SQ8", *_pq_codes(d)]:
        factory = f"{coarse},{code}"
        if index_bytes(factory, n, d) <= budget:
            return factory
    raise SpecsearchError(
        f"{n:,} vectors of dimension {d} do not fit a memory budget of {budget:,} bytes "
        "even as the smallest product-quantised index"
    )


def code_ladder(factory: str, n: int, d: int, memory_budget_bytes: int | None = None) -> list[str]:
    """``factory`` followed by the same inverted file with each finer code that fits the budget.

    Flat (exact) indexes have nothing finer: the ladder is just ``[factory]``.
    """
    if not _IVF_RE.search(factory):
        return [factory]
    budget = memory_budget_bytes or default_memory_budget()
    coarse, code = factory.rsplit(",", 1)
    finer = IVF_CODES[IVF_CODES.index(code) + 1 :] if code in IVF_CODES else IVF_CODES
    ladder = [factory]
    for better in finer:
        candidate = f"{coarse},{better}"
        if index_bytes(candidate, n, d) <= budget:
            ladder.append(candidate)
    return ladder


def index_family(factory: str) -> str:
    """'flat', 'ivf', 'graph' or 'other': what decides how an index grows and what it costs."""
    if _IVF_RE.search(factory):
        return "ivf"
    if factory in ("IDMap2,Flat", "IDMap,Flat", "Flat"):
        return "flat"
    if _HNSW_RE.match(factory):
        return "graph"
    return "other"


# --- the measured choice

SAMPLE = 200_000
"""Candidates are first measured on at most this many vectors (a build there takes 4 to 45 s)."""

FINALISTS = 2
"""Candidates timed side by side (and, for a set larger than SAMPLE, built on all of it)."""

FINALIST_RATIO = 1.5
"""A candidate more than this many times slower than the best so far is not timed further: on a
shared machine timings wander by tens of percent, by factors they do not."""

GRAPH_CANDIDATES = ("HNSW8,SQfp16", "HNSW16,SQfp16", "HNSW32,SQfp16", "HNSW16,Flat", "HNSW16,SQ8")

SPEEDS = ("single", "batch")
"""What "fastest" means: one query at a time (a user's search), or a batch (the kNN graph)."""


def candidate_factories(n: int, d: int, budget: int) -> list[str]:
    """The factories the measured choice considers for n vectors of dimension d.

    Graphs, inverted files with an HNSW quantiser (``nlist_for(n)`` lists, and half as many)
    and SQfp16 or SQ8 codes (or, when SQ8 does not fit ``budget``, the finest PQ that does),
    and exact search. Some may not fit the budget: the choice records them as such.
    """
    nlist = nlist_for(n)
    coarse = f"IVF{nlist}_HNSW32"
    # fewer, longer lists too: at the few probes a 0.95 target takes, they may scan faster
    inverted = [f"IVF{max(nlist // 2, 1)}_HNSW32,SQfp16", f"{coarse},SQfp16", f"{coarse},SQ8"]
    factories = [*GRAPH_CANDIDATES, *dict.fromkeys(inverted)]
    if index_bytes(f"{coarse},SQ8", n, d) > budget:
        fitting = [code for code in _pq_codes(d) if index_bytes(f"{coarse},{code}", n, d) <= budget]
        factories += [f"{coarse},{code}" for code in fitting[:1]]
    return [*factories, "IDMap2,Flat"]


def _at_size(factory: str, n: int, size: int) -> str:
    """``factory`` (chosen for n vectors) for a sample of ``size``: an inverted file gets the
    lists the sample calls for, in the same proportion to ``nlist_for``."""
    match = _IVF_RE.search(factory)
    if not match:
        return factory
    lists = max(int(match.group(1)) * nlist_for(size) // nlist_for(n), 1)
    return _IVF_RE.sub(f"IVF{lists}", factory, count=1)


def cost_ms(speed: dict, speed_for: str) -> float:
    """Milliseconds a query costs: single-query latency, or the batch's time per query."""
    if speed_for == "single":
        return float(speed["single_ms"])
    return 1e3 / max(float(speed["batch_qps"]), 1e-9)


def cost_growth(factory: str, measured_n: int, n: int) -> float:
    """How much more a query costs on n vectors than on the measured_n it was timed on.

    Exact search scans every vector (grows as n); an inverted file scans nprobe lists of
    n / nlist vectors with nlist ~ sqrt(n) (as sqrt(n)); a graph walks ~log(n) hops. Used only
    to rank candidates measured on a sample; the finalists are timed on the whole set.
    """
    if n <= measured_n:
        return 1.0
    family = index_family(factory)
    if family == "flat":
        return n / measured_n
    if family == "ivf":
        return math.sqrt(n / measured_n)
    return math.log(n) / math.log(max(measured_n, 2))


@dataclass
class Candidate:
    """One candidate of the choice: as measured on the sample, and on the whole set if a finalist."""

    factory: str
    bytes: int
    status: str = "measured"
    made: Made | None = None
    tuning: Tuning | None = None
    build_s: float | None = None
    sample_speed: dict = field(default_factory=dict)
    predicted: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)

    def record(self) -> dict:
        entry: dict = {"factory": self.factory, "bytes": self.bytes, "status": self.status}
        if self.tuning is not None:
            entry.update(
                search_params=self.tuning.search_params,
                recall=self.tuning.recalls,
                reached=self.tuning.reached,
                sample_speed=self.sample_speed or self.tuning.speed,
                predicted_speed=self.predicted,
                build_s=self.build_s,
                curve=self.tuning.curve,
            )
            if self.tuning.stopped:
                entry["stopped"] = self.tuning.stopped
        if self.final:
            entry["final"] = self.final
        return entry


@dataclass
class Choice:
    """The winner of ``choose_index``: its index over all the vectors given, tuned, and the record."""

    made: Made
    tuning: Tuning
    sets: list[QuerySet]
    record: dict


def choose_index(
    embeddings: np.ndarray,
    ids: np.ndarray,
    self_rows: np.ndarray,
    held_out: np.ndarray,
    target_recall: float,
    k: int,
    budget: int,
    *,
    speed_for: str = "single",
    seed: int = 0,
    show_progress: bool = False,
) -> Choice:
    """Build the candidates, measure them, and return the fastest that reaches ``target_recall``.

    Args:
        embeddings: (n, d) float32 unit vectors to index, with ``ids`` (n,) int64.
        self_rows: rows of ``embeddings`` whose recall is measured with their own id excluded.
        held_out: (m, d) vectors of the set that are not in ``embeddings`` (the caller adds them
            after the choice), whose recall is measured as that of vectors new to the index.
        target_recall: recall@k that every kind of query must reach (``measure.tune``).
        budget: the most, in bytes, the index may take (``index_bytes``).
        speed_for: "single" (one query at a time) or "batch": what "fastest" means.

    Returns:
        A ``Choice``: the winner built over ``embeddings`` with its search parameters set, its
        tuning, the query sets, and a JSON-ready record of every candidate and the reason.

    Raises SpecsearchError when no candidate fits the budget. When none reaches the target,
    the one with the highest recall wins, and the record says so.
    """
    if speed_for not in SPEEDS:
        raise SpecsearchError(f"speed_for must be one of {', '.join(SPEEDS)}, not {speed_for!r}")
    start = time.perf_counter()
    n, d = embeddings.shape
    total = n + len(held_out)  # what the index will hold: sized and budgeted for that
    candidates = [
        Candidate(f, index_bytes(f, total, d)) for f in candidate_factories(total, d, budget)
    ]
    for candidate in candidates:
        if candidate.bytes > budget:
            candidate.status = "over budget"
    if all(c.status == "over budget" for c in candidates):
        raise SpecsearchError(
            f"{total:,} vectors of dimension {d} do not fit a memory budget of {budget:,} bytes "
            "even as the smallest product-quantised index"
        )
    sample_n = min(n, SAMPLE)
    vectors, sample_ids, rows = _sample(embeddings, ids, self_rows, sample_n, seed)
    sample_sets = query_sets(vectors, sample_ids, rows, held_out, k)

    best_cost = math.inf
    for candidate in (c for c in candidates if c.status == "measured"):
        at_sample = candidate.factory if sample_n == n else _at_size(candidate.factory, n, sample_n)
        candidate.made = make(at_sample, vectors, sample_ids, seed)
        candidate.build_s = round(sum(candidate.made.seconds.values()), 3)
        growth = cost_growth(candidate.factory, sample_n, total)
        limit = best_cost * FINALIST_RATIO

        def give_up(point: dict, growth: float = growth, limit: float = limit) -> str:
            # speed only falls as the knob rises: a candidate this slow cannot catch up
            cost = cost_ms(point, speed_for) * growth
            return (
                f"slower than the best so far ({cost:.4f} > {limit:.4f} ms)" if cost > limit else ""
            )

        candidate.tuning = tune(
            candidate.made.index, sample_sets, target_recall, k, timed=True, give_up=give_up
        )
        if candidate.tuning.reached:
            speed = _predicted(candidate.tuning.speed, growth)
            best_cost = min(best_cost, cost_ms(speed, speed_for))
        else:
            candidate.status = (
                "slower" if candidate.tuning.stopped.startswith("slower") else "missed"
            )
            candidate.made = None

    # timed again side by side: one after another they met different loads of a shared machine
    reached = [c for c in candidates if c.made is not None]
    speeds = time_side_by_side(
        {c.factory: c.made.index for c in reached}, sample_sets[-1].queries, k
    )
    for candidate in reached:
        candidate.sample_speed = speeds[candidate.factory]
        growth = cost_growth(candidate.factory, sample_n, total)
        candidate.predicted = _predicted(candidate.sample_speed, growth)
    finalists = _finalists(candidates, speed_for)
    for candidate in candidates:
        if sample_n < n or candidate not in finalists:
            candidate.made = None  # finalists are built again on the whole set
    sets = sample_sets if sample_n == n else query_sets(embeddings, ids, self_rows, held_out, k)
    unbuilt = [c for c in finalists if c.made is None]
    for candidate in unbuilt:  # on the whole set
        candidate.made = make(candidate.factory, embeddings, ids, seed, show_progress=show_progress)
        candidate.tuning = tune(candidate.made.index, sets, target_recall, k, timed=True)
    if unbuilt:
        speeds = time_side_by_side(
            {c.factory: c.made.index for c in finalists}, sets[-1].queries, k
        )
    for candidate in finalists:
        candidate.final = {
            "n": int(n),
            "search_params": candidate.tuning.search_params,
            "recall": candidate.tuning.recalls,
            "reached": candidate.tuning.reached,
            "build_s": round(sum(candidate.made.seconds.values()), 3),
            **speeds[candidate.factory],
        }
    contenders = [c for c in finalists if c.tuning.reached] or finalists
    winner = min(contenders, key=lambda c: cost_ms(c.final, speed_for))
    for candidate in candidates:
        if candidate is winner or candidate in finalists:
            candidate.status = "winner" if candidate is winner else "finalist"
        elif candidate.status == "measured":
            candidate.status = "slower"  # reached the target, but not among the fastest
    other = "batch" if speed_for == "single" else "single"
    record = {
        "speed_for": speed_for,
        "n": int(total),
        "sample_n": int(sample_n),
        "budget_bytes": int(budget),
        "winner": winner.factory,
        f"{other}_winner": min(contenders, key=lambda c: cost_ms(c.final, other)).factory,
        "reason": _reason(winner, candidates, speed_for, target_recall, k),
        "finalists": [c.factory for c in finalists],
        "candidates": [c.record() for c in candidates],
        "seconds": round(time.perf_counter() - start, 3),
    }
    made, tuning = winner.made, winner.tuning
    for candidate in finalists:
        candidate.made = None
    return Choice(made, tuning, sets, record)


def _predicted(speed: dict, growth: float) -> dict:
    """Speed measured on a sample, scaled to the whole set by ``cost_growth``."""
    return {
        "batch_qps": round(speed["batch_qps"] / growth, 1),
        "single_ms": round(speed["single_ms"] * growth, 4),
    }


def _sample(
    embeddings: np.ndarray, ids: np.ndarray, self_rows: np.ndarray, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, ids, self rows within them) of a random sample of ``size`` rows that keeps the
    self-excluded query rows; the whole set when ``size`` is all of it."""
    if size >= len(embeddings):
        return embeddings, ids, self_rows
    others = np.setdiff1d(np.arange(len(embeddings)), self_rows)
    extra = np.random.default_rng(seed).choice(others, size - len(self_rows), replace=False)
    rows = np.sort(np.concatenate([self_rows, extra]))
    return np.ascontiguousarray(embeddings[rows]), ids[rows], np.searchsorted(rows, self_rows)


def _finalists(candidates: list[Candidate], speed_for: str) -> list[Candidate]:
    """The candidates to time side by side: the FINALISTS fastest of those that reached the target
    (within FINALIST_RATIO of the fastest), and the fastest by the other speed if not among them.
    If none reached it, the one with the highest recall."""
    reached = [c for c in candidates if c.tuning is not None and c.tuning.reached]
    if not reached:
        measured = [c for c in candidates if c.tuning is not None]
        return [max(measured, key=lambda c: c.tuning.recall)]
    chosen = []
    for speed in (speed_for, "batch" if speed_for == "single" else "single"):
        ranked = sorted(reached, key=lambda c, s=speed: cost_ms(c.predicted, s))
        best = cost_ms(ranked[0].predicted, speed)
        count = FINALISTS if speed == speed_for else 1
        for candidate in ranked[:count]:
            close = cost_ms(candidate.predicted, speed) <= FINALIST_RATIO * best
            if close and candidate not in chosen:
                chosen.append(candidate)
    return chosen


def _reason(
    winner: Candidate, candidates: list[Candidate], speed_for: str, target_recall: float, k: int
) -> str:
    """One sentence: why the winner won, against the other finalists and the rest."""
    if not winner.tuning.reached:
        return (
            f"no candidate reached recall@{k} {target_recall} on every kind of query: "
            f"{winner.factory} ({winner.tuning.search_params}) came closest at "
            f"{winner.tuning.recall:.4f}"
        )
    what = "one query at a time" if speed_for == "single" else "in a batch"
    unit = (
        f"{winner.final['single_ms']:.4f} ms a query"
        if speed_for == "single"
        else f"{winner.final['batch_qps']:,.0f} queries/s"
    )
    parts = [
        f"{winner.factory} ({winner.tuning.search_params}) is the fastest {what} of the "
        f"candidates that reach recall@{k} {target_recall} on every kind of query within the "
        f"memory budget: {unit}"
    ]
    cost = cost_ms(winner.final, speed_for)
    for rival in (c for c in candidates if c.status == "finalist"):
        ratio = cost_ms(rival.final, speed_for) / cost
        parts.append(f"{rival.factory} ({rival.tuning.search_params}) takes {ratio:.2f}x its time")
    predicted = cost_ms(winner.predicted, speed_for) if winner.predicted else None
    slower = [
        f"{c.factory} {cost_ms(c.predicted, speed_for) / predicted:.2f}x"
        if c.predicted and predicted
        else f"{c.factory} over {FINALIST_RATIO}x"
        for c in candidates
        if c.status == "slower"
    ]
    if slower:
        parts.append("slower: " + ", ".join(slower))
    missed = [
        f"{c.factory} (best {c.tuning.recall:.3f})" for c in candidates if c.status == "missed"
    ]
    if missed:
        parts.append("missed the target: " + ", ".join(missed))
    over = [c.factory for c in candidates if c.status == "over budget"]
    if over:
        parts.append("over budget: " + ", ".join(over))
    return "; ".join(parts)
