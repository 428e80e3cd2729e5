"""Side-by-side work on threads for numpy, BLAS-free and GIL-releasing steps (sorts, partitions,
implicit's single-threaded ALS fits) that would otherwise leave all cores but one idle.

Results come back in input order, so that whatever is summed from them is summed in the same
order as one item after another: the same bits either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def cores() -> int:
    """Cores this process may run on: its affinity where the platform says, else the machine's,
    and no more than OMP_NUM_THREADS where that is set (how Ray, Slurm and the like tell a
    process of one CPU not to start a thread per core)."""
    try:
        n = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        n = max(1, os.cpu_count() or 1)
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    return min(n, int(limit)) if limit.isdigit() and int(limit) > 0 else n


def thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 0) -> list[R]:
    """`[fn(x) for x in items]` on up to `workers` threads (0: one per core), in input order."""
    todo = list(items)
    n = min(len(todo), workers or cores())
    if n <= 1:
        return [fn(x) for x in todo]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, todo))
