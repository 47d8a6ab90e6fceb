"""An opt-in glibc allocator setting for large CPU tensors: keep freed blocks instead of unmapping them.

torch's CPU allocator has no cache: every tensor's storage is a ``posix_memalign`` and every freed one
a ``free`` (``c10/core/impl/alloc_cpu.cpp``; the caching allocator in c10 is the mobile one, off
unless a guard turns it on). glibc serves a request above its mmap threshold with a fresh ``mmap``
and gives it back with ``munmap`` on free. The threshold starts at 128 KiB and rises on its own to
the size of the largest mmapped block freed so far, but never above 32 MiB on a 64-bit system
(glibc's ``DEFAULT_MMAP_THRESHOLD_MAX``). A tensor above that, such as a Mamba block's in_proj
output at the write-up's shape ((50 * 1023, 400) float32, 82 MB), is mapped afresh on every call,
and the kernel zero-fills each of its 4 KiB pages on first touch: one training step of the
write-up's BiMamba (batch 50, L 1023, d_model 100, one thread) takes 1.4 million minor page faults
and 5.6 s of system time (``benchmarks/README.md``, "Measured (issue 13, the allocator)").

:func:`keep_large_allocations` tells glibc to serve every block from its heap (``M_MMAP_MAX`` = 0) and
not to give the heap's free top back to the kernel before it exceeds ``trim_threshold`` bytes
(``M_TRIM_THRESHOLD``): a block freed in one step is reused by the next step's request of that size,
with its pages already mapped. The cost is memory: the process's resident size stays near its peak
(up to ``trim_threshold`` above what it uses) instead of shrinking between steps.

A limit, measured with glibc 2.36 (``benchmarks/malloc_fragmentation.py``): torch asks for
64-byte-aligned blocks, and glibc 2.36 serves an aligned request only from a free block a little
larger than the request (glibc 2.38 added a search for a free block already aligned; not measured
here). A loop that frees a tensor and asks for one of the same size, while
keeping a small new tensor each time, can then grow the heap by the tensor's size per iteration
instead of reusing the freed block: 20 iterations of a 64 MiB tensor leave 1.3 GiB of heap with this
setting, 83 MiB without. glibc does the same without the setting for tensors below its mmap
threshold (20 MiB tensors: 443 MiB of heap); the setting extends it to every size. The write-up's
training step does not do this: after its warm-up step it takes at most 0.05 million page faults a
step (1.4 million untuned) and its peak resident size is 3.86 GiB against 3.57 GiB untuned
(``benchmarks/bench_malloc_env.py``; ``benchmarks/README.md``, "Measured (issue 13, the allocator)").
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_large_allocations"]

# mallopt's parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

#: glibc's defaults (malloc/malloc.c): DEFAULT_MMAP_MAX, and DEFAULT_MMAP_THRESHOLD_MAX on this
#: platform, the most the dynamic mmap threshold ever reaches (the trim threshold follows it at 2x)
_GLIBC_MMAP_MAX = 65536
_GLIBC_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)


def _glibc():
    """glibc's handle (the C library this process runs on), or None where it is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, libc's among them
    except OSError:
        return None
    # gnu_get_libc_version: only glibc has it (musl and bionic have mallopt too, with other meanings)
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def keep_large_allocations(enable: bool = True, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed blocks of every size for reuse (process-wide, glibc only, opt-in).

    ``enable=True``: ``mallopt(M_MMAP_MAX, 0)``, so no block is served by ``mmap`` (every one comes
    from the heap, where a freed block is reused by the next request that fits), and
    ``mallopt(M_TRIM_THRESHOLD, trim_threshold)``, so the heap's free top stays mapped until it
    exceeds ``trim_threshold`` bytes (default 1 GiB). Calling it again sets the same values.

    ``enable=False``: back to glibc's behaviour for blocks up to 32 MiB: ``M_MMAP_MAX`` 65536
    (glibc's default), mmap threshold 32 MiB and trim threshold 64 MiB, the values glibc's dynamic
    threshold reaches in a process that has freed a 32 MiB block; then ``malloc_trim(0)`` gives the
    kept free memory back to the kernel, so that the next large request is mapped afresh again. It is
    not the state of a fresh process: any ``mallopt`` call switches glibc's dynamic threshold off
    for good.

    Affects the whole process and every library in it (torch, numpy, numba, Python), from the next
    allocation on; blocks already mapped stay as they are. Threads other than the main one allocate
    from glibc's per-thread arenas, which still map a block that does not fit their 64 MiB heaps.
    Nothing here is read at import: call it once, early, in the process that trains (a script, a
    worker), not in a library.

    Args:
        enable: True to keep freed blocks, False to restore the behaviour above.
        trim_threshold: bytes of free heap top kept mapped (``enable=True`` only); > 0.

    Returns:
        True when glibc accepted every setting; False, changing nothing, where the C library is not
        glibc (macOS, Windows, musl).

    Raises:
        ValueError: ``trim_threshold`` not a positive int that fits a C int.
    """
    if not (isinstance(trim_threshold, int) and 0 < trim_threshold < 2**31):
        raise ValueError(f"trim_threshold must be an int in (0, 2**31), got {trim_threshold!r}")
    libc = _glibc()
    if libc is None:
        return False
    if enable:
        settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim_threshold))
    else:
        settings = ((_M_MMAP_MAX, _GLIBC_MMAP_MAX), (_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX),
                    (_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX))
    accepted = [libc.mallopt(param, value) == 1 for param, value in settings]  # every one, even after a refusal
    if not enable:
        libc.malloc_trim(0)  # returns 1 when it released memory, 0 when there was none: not a failure
    return all(accepted)
