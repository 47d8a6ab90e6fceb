r"""Reused memory for the compiled kernels' large outputs and saved tensors (CPU, float32).

Why: torch's CPU allocator has no cache (every storage is a ``posix_memalign``, every free a
``free``), and glibc maps any block above its mmap threshold (at most 32 MiB) afresh and unmaps it on
free, so the kernel zero-fills each 4 KiB page of such a tensor again on first touch. The selective
scan of one Mamba block at the write-up's shape (batch 50, L 1023, d_inner 200) makes seven
(50, 1023, 200) float32 tensors (41 MB each) per forward and backward: its output, delta after
softplus and y + D u saved for the backward, the saved chunk states, and three gradients. In the
write-up's training step (8 scans) the scans' minor page faults cost about 3 s of system time of a
15 s step on one thread (``python benchmarks/bench_scan.py``, ``ours`` against ``no-scan``:
benchmarks/README.md, "Measured (issue 13, the scan's share, and its own memory)").
:func:`prot_lib.utils.keep_large_allocations` removes the faults for the whole process, but it
changes every allocation of the process and is opt-in; this pool touches only the kernels' own
tensors and is on by default.

How: :func:`empty` hands out a view of a base tensor the pool keeps, one base per request that
found no free one. A base is free when nothing but the pool refers to its storage, which torch counts
(``torch._C._storage_Use_Count``: every tensor and view of the storage, numpy arrays made from it,
tensors that autograd saved for a backward and outputs that someone still holds). So a tensor is
never handed out twice while anyone can still read it: a graph kept for a second backward
(``retain_graph=True``), an output the caller keeps, a saved tensor of a graph not yet freed all
keep their bases busy. Stale contents are not cleared: like ``torch.empty``, the caller writes every
element (the kernels of :mod:`.numba_scan` and :mod:`.numba_conv` do).

Only tensors of at least :data:`MIN_BYTES` are pooled (below, glibc's heap serves them without fresh
pages); the pool keeps at most ``$PROT_LIB_BUFFER_POOL_MB`` MiB of bases (default
:data:`DEFAULT_LIMIT_MB`; 0 switches the pool off) and allocates as torch does beyond that. Bases
are matched by exact element count and dtype, so a handed-out tensor's storage is exactly its size.
:func:`clear` drops every free base (memory back to the C library); :func:`stats` reports the pool.
Where torch lacks ``_storage_Use_Count`` the pool is off (:func:`enabled` says so).
"""
from __future__ import annotations

import os
import threading
from typing import Dict, List, Sequence

import torch

__all__ = ["empty", "clear", "stats", "enabled", "MIN_BYTES", "DEFAULT_LIMIT_MB"]

#: Smallest tensor the pool keeps (bytes).
MIN_BYTES = 1 << 20
#: Default limit of the bases kept (MiB); ``$PROT_LIB_BUFFER_POOL_MB`` overrides it.
DEFAULT_LIMIT_MB = 4096

_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
# references to a free base's storage while it is checked: the base itself and the temporary
# UntypedStorage object (measured with torch 2.13; tests/test_buffer_pool.py checks it)
_FREE_COUNT = 2

_LOCK = threading.Lock()
_BASES: Dict[tuple, List[torch.Tensor]] = {}
_HELD = [0]  # bytes of all bases
_COUNTS = {"reused": 0, "new": 0, "unpooled": 0}


def _limit_bytes() -> int:
    raw = os.environ.get("PROT_LIB_BUFFER_POOL_MB", str(DEFAULT_LIMIT_MB))
    try:
        mb = float(raw)
    except ValueError as err:
        raise ValueError(f"$PROT_LIB_BUFFER_POOL_MB must be a number of MiB (0: off), got {raw!r}") from err
    return int(mb * 2**20)


def enabled() -> bool:
    """True where the pool is in use: torch counts storage references and the limit is above 0.

    Raises:
        ValueError: ``$PROT_LIB_BUFFER_POOL_MB`` is not a number.
    """
    return _USE_COUNT is not None and _limit_bytes() > 0


def _is_free(base: torch.Tensor) -> bool:
    return _USE_COUNT(base.untyped_storage()._cdata) <= _FREE_COUNT


def empty(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, from the pool's memory where it can be.

    Args:
        shape: the tensor's shape.
        dtype: its dtype.

    Returns:
        A tensor of ``shape`` and ``dtype`` on the CPU, like ``torch.empty(shape, dtype=dtype)``:
        its contents are arbitrary (possibly an earlier tensor's). Tensors below :data:`MIN_BYTES`,
        or beyond the pool's limit, or with the pool off, are plain ``torch.empty``.

    Raises:
        ValueError: ``$PROT_LIB_BUFFER_POOL_MB`` is not a number.
    """
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * dtype.itemsize
    if nbytes < MIN_BYTES or not enabled():
        return torch.empty(shape, dtype=dtype)
    key = (numel, dtype)
    with _LOCK:
        for base in _BASES.get(key, ()):
            if _is_free(base):
                _COUNTS["reused"] += 1
                return base.view(shape)
        if _HELD[0] + nbytes > _limit_bytes():
            _COUNTS["unpooled"] += 1
            return torch.empty(shape, dtype=dtype)
        base = torch.empty(numel, dtype=dtype)
        _BASES.setdefault(key, []).append(base)
        _HELD[0] += nbytes
        _COUNTS["new"] += 1
        return base.view(shape)


def clear() -> int:
    """Drop every base that nothing else refers to; returns the bytes given back."""
    freed = 0
    with _LOCK:
        for key in list(_BASES):
            keep = []
            for base in _BASES[key]:
                if _is_free(base):
                    freed += base.numel() * base.element_size()
                else:
                    keep.append(base)
            if keep:
                _BASES[key] = keep
            else:
                del _BASES[key]
        _HELD[0] -= freed
    return freed


def stats() -> Dict[str, int]:
    """The pool now: ``bases``, ``held_bytes``, ``free_bases`` (nothing else refers to them), and
    since the process started ``reused``, ``new`` (bases made) and ``unpooled`` (requests beyond
    the limit)."""
    with _LOCK:
        bases = [b for group in _BASES.values() for b in group]
        return {"bases": len(bases), "held_bytes": _HELD[0],
                "free_bases": sum(_is_free(b) for b in bases), **_COUNTS}


def _after_fork_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # a lock held by another thread at fork() would never be released


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
