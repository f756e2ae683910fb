"""Vector indexes (FAISS) over specsearch embeddings.

This package lives in the repository's top-level ``indexes/`` folder and is installed as
``specsearch.indexes`` (``pyproject.toml`` maps it with ``package-dir``), so it is imported as
``from specsearch.indexes import ...`` and its modules read ``specsearch.*`` like any other.

One entry point builds an index for a set of unit vectors (``build_index``): it measures a few
candidate indexes and keeps the fastest that reaches a target recall within a memory budget
(``choose.choose_index``), tuned to that recall; the store functions read
the store's embedding Parquet, save ``STORE/indexes/<modality>.faiss`` with a JSON of its
parameters and measured recall beside it, grow it release by release, and search it.
"""

from .build import build_index, build_index_streaming, build_sharded_index, empty_copy
from .choose import (
    DEFAULT_TARGET_RECALL,
    EXACT_THRESHOLD,
    choose_factory,
    choose_index,
    default_memory_budget,
    nlist_for,
)
from .device import CpuDevice, GpuDevice, resolve_device
from .io import (
    extend_index,
    index_ids,
    iter_index_vectors,
    load_index,
    read_params,
    save_index,
)
from .make import make_index
from .measure import (
    QuerySet,
    drop_self,
    exact_knn,
    exact_knn_streaming,
    query_sets,
    recall_at_k,
    time_side_by_side,
    tune,
    tune_search_params,
)
from .store_indexes import (
    IndexResult,
    build_store_indexes,
    extend_store_indexes,
    iter_embeddings,
    load_store_index,
    read_vectors,
    scan_embeddings,
    search_store,
)
from .synthetic import sphere_mixture

__all__ = [
    "DEFAULT_TARGET_RECALL",
    "EXACT_THRESHOLD",
    "IndexResult",
    "QuerySet",
    "CpuDevice",
    "GpuDevice",
    "build_index",
    "build_index_streaming",
    "build_sharded_index",
    "build_store_indexes",
    "choose_factory",
    "choose_index",
    "default_memory_budget",
    "drop_self",
    "empty_copy",
    "exact_knn",
    "exact_knn_streaming",
    "extend_index",
    "extend_store_indexes",
    "index_ids",
    "iter_embeddings",
    "iter_index_vectors",
    "load_index",
    "load_store_index",
    "make_index",
    "nlist_for",
    "query_sets",
    "read_vectors",
    "read_params",
    "recall_at_k",
    "resolve_device",
    "save_index",
    "scan_embeddings",
    "search_store",
    "sphere_mixture",
    "time_side_by_side",
    "tune",
    "tune_search_params",
]
