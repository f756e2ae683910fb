"""Worker processes for per-file reading: results in submission order, a bounded number in flight."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any


@contextlib.contextmanager
def parallel_map(
    job: Callable[[Any], Any], items: Iterable[Any], workers: int
) -> Iterator[Iterator[Any]]:
    """Yield the results of ``job`` over ``items``, in order: from ``workers`` processes when
    there are that many and more than one item, else computed here. ``job`` and the items must
    pickle (a module-level function or a functools.partial of one)."""
    items = list(items)
    workers = min(workers, len(items))
    if workers <= 1:
        yield map(job, items)
        return
    with ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        yield ordered_map(pool, job, items, ahead=2 * workers)


def die_with_parent(parent: int) -> None:
    """Run in a worker process: the kernel kills it when its parent dies (Linux), so a
    ``kill -9`` of specsearch leaves no worker behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


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
