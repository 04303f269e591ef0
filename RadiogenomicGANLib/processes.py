"""Work spread over processes, one item each, results in the items' order (phantom writing, dataset preparation).

Spawned, not forked: callers may have imported torch, whose thread pools a fork does not carry safely.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

MAX_DEFAULT_WORKERS = 8


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """The usable cores, at most 8: the default number of worker processes."""
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cores()))


@contextlib.contextmanager
def ordered_map(workers: int, items: int) -> Iterator[Any]:
    """Something with an ordered, lazy `map`: this process alone (1 worker, or 1 item), else a pool of
    `workers` spawned processes (never more than there are items)."""
    workers = max(1, min(workers, items))
    if workers == 1:
        yield builtins
        return
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool
