"""Which FAISS index to build for n vectors of dimension d under a memory budget.

The rule (autofaiss-style, on inner product = cosine for L2-normalised vectors):

- fewer than ``exact_threshold`` vectors and the raw vectors fit the budget: exact search,
  ``IDMap2,Flat`` (4 d + 8 bytes a vector);
- otherwise an inverted file with ``nlist ~ 4 sqrt(n)`` lists (a power of two) and an HNSW coarse
  quantiser (a flat one on GPU, where HNSW does not run), whose codes are the finest of
  ``SQ8`` (d + 8 bytes a vector), ``PQ{m}`` (m + 8 bytes) that fit the budget.

``code_ladder`` lists the finer codes that ``build_index`` may step up to when the tuned index
cannot reach the target recall with the codes first chosen.
"""

from __future__ import annotations

import math
import os
import re

from specsearch.errors import SpecsearchError

DEFAULT_TARGET_RECALL = 0.95
"""Recall@10 that ``auto`` tunes an index to, unless told otherwise."""

EXACT_THRESHOLD = 50_000
"""Below this many vectors ``auto`` builds an exact index: brute force is fast enough there."""

MIN_POINTS_PER_LIST = 39
"""FAISS warns when k-means has fewer training points than this per centroid."""

IVF_CODES = ("SQ8", "SQfp16", "Flat")
"""Inverted-list codes from coarsest to finest that ``auto`` may use (PQ comes before these)."""

_IVF_RE = re.compile(r"IVF(\d+)")


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
    """Estimated memory of an index built by ``factory`` over n vectors (codes + ids + lists)."""
    if factory in ("IDMap2,Flat", "Flat"):
        return n * (4 * d + 8)
    match = _IVF_RE.search(factory)
    if not match:
        return n * (4 * d + 8)  # unknown structure: assume raw vectors
    nlist = int(match.group(1))
    code = factory.rsplit(",", 1)[-1]
    quantizer = nlist * 4 * d * (2 if "HNSW" in factory else 1)
    return n * (code_bytes(code, d) + 8) + quantizer


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
    """'flat', 'ivf' or 'other': what decides whether an index can grow in place."""
    if _IVF_RE.search(factory):
        return "ivf"
    if factory in ("IDMap2,Flat", "IDMap,Flat", "Flat"):
        return "flat"
    return "other"
