"""Where a build spends its time: one line per k-fold run, appended to the file ``$PROT_LIB_LEDGER``.

The book's chapters take minutes because they train; how many fold runs and optimizer steps each
chapter trains, and how many it reads back from the run cache, is what a chapter's wall time is made
of. :func:`~prot_lib.training.kfold.run_kfold` calls :func:`record_run` for every run when the
environment variable ``PROT_LIB_LEDGER`` names a file (``scripts/build_book.py`` sets one per chapter);
:func:`summarize_ledger` sums a chapter's lines for ``book/_timings/<mode>.json``. Sweep workers
inherit the variable, so their runs are counted too (their seconds add up over processes: the sum
can exceed the chapter's wall time). Nothing is written when the variable is unset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import pandas as pd

__all__ = ["LEDGER_ENV", "record_run", "read_ledger", "summarize_ledger"]

LEDGER_ENV = "PROT_LIB_LEDGER"


def record_run(config, n_folds: int, steps: int, seconds: float, cached: bool,
               path: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """Append one line for a finished :func:`~prot_lib.training.kfold.run_kfold` call.

    Args:
        config: its :class:`~prot_lib.training.config.RunConfig` (dataset, topology and size are recorded).
        n_folds: folds run (or read back).
        steps: optimizer steps over those folds (the summary's ``n_steps`` summed).
        seconds: wall clock of the call, s.
        cached: read back from the run cache (``PROT_LIB_CACHE``) rather than trained.
        path: the ledger file (default: ``$PROT_LIB_LEDGER``; None and unset: nothing is written).

    Returns:
        the file written, or None.

    One ``write`` of one line in append mode: lines of several processes do not interleave (POSIX
    appends of a few hundred bytes to a local file).
    """
    path = path if path is not None else os.environ.get(LEDGER_ENV)
    if not path:
        return None
    m = config.model
    line = {"dataset": config.data.name, "topology": m.topology, "d_model": m.d_model, "n_layers": m.n_layers,
            "folds": int(n_folds), "steps": int(steps), "seconds": round(float(seconds), 3), "cached": bool(cached),
            "pid": os.getpid()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
    return path


def read_ledger(path: Union[str, Path]) -> pd.DataFrame:
    """The ledger's lines as a table (empty, with the columns, when the file does not exist).

    Raises:
        ValueError: a line that is not JSON (names the file and line number).
    """
    cols = ["dataset", "topology", "d_model", "n_layers", "folds", "steps", "seconds", "cached", "pid"]
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=cols)
    rows = []
    for i, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text.strip():
            try:
                rows.append(json.loads(text))
            except ValueError as exc:
                raise ValueError(f"{path}: line {i} is not JSON ({exc})") from exc
    return pd.DataFrame(rows, columns=cols)


def summarize_ledger(df: pd.DataFrame) -> Dict[str, Any]:
    """A chapter's training in five numbers: ``train_s`` (seconds in trained runs, summed over
    processes), ``fold_runs`` and ``steps`` trained, ``ms_per_step`` (train_s / steps * 1000, None
    without steps), ``cached_runs`` (runs read back from the cache) and ``cached_s`` (their seconds)."""
    trained, cached = df[~df["cached"].astype(bool)], df[df["cached"].astype(bool)]
    steps = int(trained["steps"].sum())
    train_s = float(trained["seconds"].sum())
    return {"train_s": round(train_s, 1), "fold_runs": int(trained["folds"].sum()), "steps": steps,
            "ms_per_step": round(1000 * train_s / steps, 1) if steps else None,
            "cached_runs": int(len(cached)), "cached_s": round(float(cached["seconds"].sum()), 1)}
