"""Load a dataset by name: the entry point the training code and the book use.

    load_dataset("ishigami") -> SequenceData, x (1000, 3, 4)    analytic benchmark
    load_dataset("dyconex")  -> SequenceData, x (600, 18, 11)   SYNTHETIC stand-in
    load_dataset("dyconex_long")    -> x (250, 1023, 15)        SYNTHETIC long stand-in
    load_dataset("dyconex_long_ci") -> x (100, 99, 15)          its CI-size variant

The first two read the shipped CSV files (they never regenerate them) from ``data_dir``, else
``$PROT_LIB_DATA``, else ``<repo>/data``; the long stand-ins are generated at load time
(:mod:`prot_lib.data.dyconex_long`; ``data_dir`` is not read).
"""

from __future__ import annotations

import os

from .base import DataError, SequenceData
from .dyconex import STEPS_FILE, TARGETS_FILE, load_dyconex
from .dyconex_long import VARIANTS as LONG_VARIANTS
from .dyconex_long import load_dyconex_long
from .ishigami import ISHIGAMI_FILE, load_ishigami
from .tables import data_dir as resolve_data_dir

__all__ = ["DATASETS", "load_dataset"]

DATASETS = ("ishigami", "dyconex", *LONG_VARIANTS)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> SequenceData:
    """The raw dataset ``name`` (one of :data:`DATASETS`) from the files in ``data_dir``.

    Returns SequenceData with raw x (N, L, F) float32 and y (N,) float32.
    Raises DataError: unknown name (lists the valid names), or any loader error
    (missing file, bad column or cell; see load_ishigami / load_dyconex).
    """
    folder = resolve_data_dir(data_dir)
    if name == "ishigami":
        return load_ishigami(folder / ISHIGAMI_FILE)
    if name == "dyconex":
        return load_dyconex(folder / STEPS_FILE, folder / TARGETS_FILE)
    if name in LONG_VARIANTS:
        return load_dyconex_long(name)
    raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(repr(n) for n in DATASETS)}")
