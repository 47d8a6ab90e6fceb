"""The limit of :func:`prot_lib.utils.keep_large_allocations` measured on glibc 2.36: heap growth in a loop.

A loop frees a tensor of SIZE MiB, asks for one of the same size, and keeps a small new tensor each
time, 20 times; prints glibc's heap size afterwards (``mallinfo2().arena``). torch asks for
64-byte-aligned blocks, and glibc 2.36 serves an aligned request only from a free block a little
larger than the request (2.38 added a search for an already aligned one), so the freed block,
once a small allocation has taken its first bytes, is passed over and the heap grows instead.

Usage (Linux, glibc >= 2.33 for mallinfo2):
    for a in "64 off" "64 on" "20 off" "20 on"; do python benchmarks/malloc_fragmentation.py $a; done
"""
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prot_lib.utils import keep_large_allocations  # noqa: E402


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def main(size_mib: int, setting: str) -> int:
    """Heap bytes after the loop; ``setting`` "on" calls keep_large_allocations() first."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    if setting == "on" and not keep_large_allocations():
        raise SystemExit("keep_large_allocations() returned False: not glibc")
    kept = []
    for _ in range(20):
        t = torch.empty(size_mib << 18).fill_(1.0)  # size_mib MiB of float32
        kept.append(torch.ones(3))
        del t
    heap = libc.mallinfo2().arena
    print(f"{size_mib} MiB tensor, setting {setting}: heap {heap >> 20} MiB after 20 iterations")
    return heap


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
