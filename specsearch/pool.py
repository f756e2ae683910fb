"""Worker processes for per-file reading: results in submission order, a bounded number in flight."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any


def ordered_map(
    pool: Executor, job: Callable[[Any], Any], items: Iterable[Any], ahead: int
) -> Iterator[Any]:
    """``pool.map(job, items)`` with at most ``ahead`` jobs submitted and not yet consumed, so
    finished results never pile up in memory while the consumer is busy."""
    pending: collections.deque = collections.deque()
    remaining = iter(items)
    for item in itertools.islice(remaining, max(1, ahead)):
        pending.append(pool.submit(job, item))
    while pending:
        result = pending.popleft().result()
        for item in itertools.islice(remaining, 1):
            pending.append(pool.submit(job, item))
        yield result
