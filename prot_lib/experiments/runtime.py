"""How a sweep's worker process is set up: one thread per worker, and no Lightning chatter.

These models are tiny (a few thousand weights, batches of 32): one torch thread per run is faster than
two on a loaded 2-core machine, and a sweep gets its parallelism from running several cells at once
(one process per core), not from threads inside a cell.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

import torch

__all__ = ["quiet_lightning", "one_thread_per_worker"]

#: Lightning's loggers that print "GPU available: ..." and tips at every Trainer construction
_CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")


@contextlib.contextmanager
def quiet_lightning(level: int = logging.WARNING) -> Iterator[None]:
    """Raise Lightning's loggers to ``level`` for the duration (a widget redraw or a sweep cell
    should print nothing)."""
    loggers = [logging.getLogger(n) for n in _CHATTY_LOGGERS]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


def one_thread_per_worker() -> None:
    """Make this (worker) process compute with one thread: torch's intra-op pool, OpenMP/MKL, and
    numba's pool when numba is there.

    ``NUMBA_NUM_THREADS`` is read when numba is first imported, so setting it here covers a numba
    kernel imported later by the first forward pass; a numba already imported is told with
    ``numba.set_num_threads(1)``. Called by the engines in their worker processes only, never in
    the caller's own process (a notebook kernel keeps its settings).
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"
    torch.set_num_threads(1)
    numba = sys.modules.get("numba")
    if numba is not None:
        numba.set_num_threads(1)
