"""Making one FAISS index: factory string -> empty index with ids -> trained -> filled.

``build.build_index`` and the measured choice (``choose.choose_index``) both make their indexes
here, so a candidate measured during the choice is built exactly as the index that is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np

from specsearch.errors import SpecsearchError
from specsearch.progress import progress

from .device import CpuDevice
from .measure import graph_of, ivf_of

ADD_BATCH = 65_536
TRAIN_POINTS_PER_LIST = 64
"""k-means training sample per inverted list (FAISS needs at least 39)."""
KMEANS_ITERATIONS = 10
MAX_TRAIN_OTHER = 100_000
"""Training sample for trainable indexes that are not inverted files (e.g. a flat PQ)."""
GRAPH_EF_CONSTRUCTION = 80
"""Width of the search that links each vector added to a graph (HNSW ``efConstruction``; FAISS's
default is 40). On 200k XP embeddings, 80 raised recall@10 at efSearch=10 from 0.968 to 0.974
for HNSW16,SQfp16 and from 0.960 to 0.962 for HNSW8,SQfp16, for twice the add time: a better
graph reaches the target at a smaller efSearch, and every search after is faster for it. Kept
in the index file, so vectors added later are linked the same way."""


def make_index(factory: str, d: int) -> faiss.Index:
    """An empty inner-product index from a FAISS factory string, able to take explicit ids.

    Types without native ids (Flat, HNSW, PQ, ...) are wrapped in ``IndexIDMap``: 8 bytes an id
    (``IDMap2``'s reverse map would add ~40 more, for a lookup by id nothing here does). A graph
    links its vectors with ``GRAPH_EF_CONSTRUCTION``.
    """
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        message = str(err).strip().splitlines()[-1] if str(err).strip() else "invalid"
        raise SpecsearchError(f"FAISS factory {factory!r} for d={d}: {message}") from None
    graph = graph_of(index)
    if graph is not None:
        graph.hnsw.efConstruction = GRAPH_EF_CONSTRUCTION
    if is_ivf(index) or isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return index
    return faiss.IndexIDMap(index)  # the wrapper keeps a Python reference to the inner index


def is_ivf(index: faiss.Index) -> bool:
    """Whether ``index`` is, or wraps, an inverted file (on the CPU or a GPU)."""
    return ivf_of(index) is not None


def train_index(
    index: faiss.Index, embeddings: np.ndarray, seed: int = 0, device: CpuDevice | None = None
) -> int:
    """Train ``index`` on a random sample of ``embeddings``; return the sample size (0: no training).

    Inverted files use TRAIN_POINTS_PER_LIST vectors a list and KMEANS_ITERATIONS iterations of
    spherical k-means; on a GPU device the k-means assignment runs there even when the index
    itself stays on the CPU.
    """
    if index.is_trained:
        return 0
    device = device or CpuDevice()
    n = len(embeddings)
    ivf = ivf_of(index)
    size = min(n, TRAIN_POINTS_PER_LIST * ivf.nlist if ivf is not None else MAX_TRAIN_OTHER)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    sample = np.ascontiguousarray(embeddings[rows])
    clustering = None
    if ivf is not None:
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.seed = seed
    cpu_ivf = faiss.try_extract_index_ivf(index)
    if cpu_ivf is not None:  # a GPU IVF index runs its own k-means on the GPU
        clustering = device.clustering_index(cpu_ivf.d)
        if clustering is not None:
            cpu_ivf.clustering_index = clustering
    try:
        index.train(sample)
    finally:
        if clustering is not None:
            cpu_ivf.clustering_index = None
    return size


def add_vectors(
    index: faiss.Index, embeddings: np.ndarray, ids: np.ndarray, show_progress: bool = True
) -> None:
    """Add vectors with their ids, with a progress bar: in batches of ADD_BATCH, except into a
    graph, which takes them in one call (a graph built batch by batch links worse: recall@10
    0.950 instead of 0.956 at the same efSearch on 200k XP embeddings)."""
    batch = len(embeddings) if graph_of(index) is not None else ADD_BATCH
    with progress("adding vectors", len(embeddings), show_progress) as advance:
        for start in range(0, len(embeddings), max(batch, 1)):
            stop = min(start + batch, len(embeddings))
            index.add_with_ids(embeddings[start:stop], ids[start:stop])
            advance(stop - start)


@dataclass
class Made:
    """An index made by ``make``, with the seconds each step took."""

    index: faiss.Index
    factory: str
    train_size: int
    seconds: dict[str, float]


def make(
    factory: str,
    embeddings: np.ndarray,
    ids: np.ndarray,
    seed: int = 0,
    device: CpuDevice | None = None,
    show_progress: bool = False,
) -> Made:
    """An index of ``factory`` over ``embeddings`` (n, d) float32 unit vectors with ``ids`` (n,).

    Trained on a sample of ``embeddings`` (see ``train_index``), then filled with all of them.
    The index is on ``device`` (the CPU by default).
    """
    device = device or CpuDevice()
    start = time.perf_counter()
    index = device.to_device(make_index(factory, embeddings.shape[1]))
    train_size = train_index(index, embeddings, seed, device)
    trained = time.perf_counter()
    add_vectors(index, embeddings, ids, show_progress)
    added = time.perf_counter()
    seconds = {"train": round(trained - start, 3), "add": round(added - trained, 3)}
    return Made(index, factory, train_size, seconds)
