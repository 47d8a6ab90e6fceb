"""The run cache: a finished k-fold run stored on disk, so the same run is never trained twice.

When the environment variable ``PROT_LIB_CACHE`` names a folder (the book build and the notebook
tests set it; the sweep engine passes it on to its workers), :func:`~prot_lib.training.kfold.run_kfold`
looks a run up here before training and stores it after. The book's chapters share runs this way:
chapter 4's clip sweep at clipping off, seed 0, all folds *is* chapter 1's reproduction, and is read
back instead of retrained.

An entry is keyed by

- the run's configuration, without ``name`` and ``description`` (two names for one configuration,
  e.g. ``dyconex_lower-lr`` and ``dyconex_unmitigated`` whose lr already is 1e-4, are one run);
- the folds trained and ``max_steps``;
- a hash of the library's own source and shipped configs (:func:`source_fingerprint`), so an entry
  dies with any change of the code that produced it;
- the torch version.

Each entry is a ``torch.save`` file ``<key>.pt`` (the run's tables and trained weights, written with
:func:`prot_lib.utils.atomic_torch_save`) and a folder ``<key>_logs/`` with a copy of the run's CSV
logs, so a cached result's ``run_dir`` holds real logs.

Why not ``joblib.Memory``: it keys a call by its arguments and the decorated function's own code,
not by the code that function calls (the model, the module, the data), which is what decides a
run's numbers here; and it would pickle Lightning modules, where this stores state dicts. The key,
the store and the atomic write are the whole of it (this module).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

from ..utils.io import atomic_torch_save

__all__ = ["ENV_VAR", "cache_dir", "source_fingerprint", "run_key", "entry_path", "load_entry", "save_entry"]

#: the environment variable naming the cache folder (unset or empty: no cache)
ENV_VAR = "PROT_LIB_CACHE"
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Optional[Path]:
    """The cache folder named by ``$PROT_LIB_CACHE``, or None when caching is off."""
    value = os.environ.get(ENV_VAR)
    return Path(value) if value else None


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """16 hex digits of SHA-256 over every ``.py`` and ``.yaml`` file of the ``prot_lib`` package
    (relative path and bytes, in sorted order).

    Computed once per process: the code a process runs is the code it imported, whatever happens to
    the files afterwards."""
    h = hashlib.sha256()
    for p in sorted(_PACKAGE_ROOT.rglob("*")):
        if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts:
            h.update(p.relative_to(_PACKAGE_ROOT).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def run_key(config: Dict[str, Any], folds: Iterable[int], max_steps: int) -> str:
    """20 hex digits naming one run: ``config`` (``RunConfig.to_dict()``; ``name`` and
    ``description`` are ignored), the folds, ``max_steps``, :func:`source_fingerprint` and the torch
    version."""
    cfg = {k: v for k, v in config.items() if k not in ("name", "description")}
    key = json.dumps({"config": cfg, "folds": [int(f) for f in folds], "max_steps": int(max_steps),
                      "src": source_fingerprint(), "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def entry_path(config: Dict[str, Any], folds: Iterable[int], max_steps: int) -> Optional[Path]:
    """``$PROT_LIB_CACHE/<run_key>.pt``, or None when caching is off."""
    root = cache_dir()
    return None if root is None else root / f"{run_key(config, folds, max_steps)}.pt"


def load_entry(path: Path) -> Dict[str, Any]:
    """The payload stored by :func:`save_entry` (a dict; ``run_dir`` is the entry's logs folder).

    Raises:
        FileNotFoundError: no such entry.
    """
    # weights_only=False: the payload holds pandas DataFrames, written by this library itself
    return torch.load(path, weights_only=False)


def save_entry(path: Path, payload: Dict[str, Any], logs: Optional[Path] = None) -> None:
    """Store ``payload`` (a dict of tables, warnings and state dicts) at ``path``, and a copy of the
    folder ``logs`` (the run's CSV logs) as ``<path stem>_logs/``; ``payload["run_dir"]`` is set to
    that folder.

    Two processes may store the same entry at once (two notebooks, two sweep workers): the file is
    replaced atomically, and the logs folder is copied under a temporary name and renamed into place
    only when no other writer got there first (runs are deterministic, so either copy will do).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.stem + "_logs")
    if logs is not None and Path(logs).is_dir() and not target.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=path.parent))
        shutil.copytree(logs, tmp, dirs_exist_ok=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another writer renamed its copy first
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_torch_save({**payload, "run_dir": str(target)}, path)
