"""Small helpers every layer may use; they import nothing from the rest of ``prot_lib``.

- :mod:`prot_lib.utils.io`: atomic file writes (a reader never sees half a file, a crash never
  leaves one behind): :func:`atomic_write`, :func:`atomic_write_text`, :func:`atomic_torch_save`.
- :mod:`prot_lib.utils.malloc`: :func:`keep_large_allocations`, an opt-in, process-wide glibc setting
  that keeps freed large blocks for reuse instead of mapping every large tensor afresh.
- :mod:`prot_lib.utils.tensors`: :func:`clone_batch`, detached copies of a (nested) batch.
"""
from .io import atomic_torch_save, atomic_write, atomic_write_bytes, atomic_write_text
from .malloc import keep_large_allocations
from .tensors import clone_batch

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "clone_batch",
           "keep_large_allocations"]
