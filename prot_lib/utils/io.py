"""Atomic writes: the one way this project replaces a file.

A file is written to a temporary name in the target's own folder (``.<name>.<random>.tmp``, so the
rename never crosses a file system), flushed and fsynced, then ``os.replace``-d over the target.
``os.replace`` is atomic on POSIX and Windows: a reader sees the old file or the new one, never a
prefix of the new one. An exception while writing removes the temporary file and leaves the target
as it was; a killed process may leave a ``.tmp`` file behind, never a truncated target.

The project's writers of run-cache entries, sweep cells, checkpoints and repro bundles all go through
these helpers, so there is one place where "replace a file" is defined.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Union

import torch

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save"]

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit, replace ``path`` with it.

    Args:
        path: the target file; its parent folders are created.
        mode: ``"wb"`` (bytes) or ``"w"`` (text).
        encoding: text encoding for ``mode="w"`` (default UTF-8).

    Yields:
        the open temporary file.

    Raises:
        ValueError: ``mode`` is not a write mode ("w" or "wb").
        Whatever the body raises: the temporary file is removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary *path* beside ``path``; on a clean exit fsync it and move it onto ``path``.

    For writers that take a file name rather than an open file (Lightning's
    ``trainer.save_checkpoint`` through any ``CheckpointIO``). The caller writes the temporary file.

    Raises:
        FileNotFoundError: the writer did not create the temporary file.
        Whatever the body raises: the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:  # the data is on disk before the name points at it
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)``, atomically; returns the path.

    Raises:
        Whatever ``torch.save`` raises (e.g. an unpicklable object); ``path`` is then untouched.
    """
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)
