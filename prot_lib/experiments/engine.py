"""The sweep engine: run a list of cells on every core, or on a Dask cluster, and keep each result.

:func:`run_cells` takes :class:`~prot_lib.experiments.cells.Cell` objects and returns their rows
(:func:`~prot_lib.experiments.cells.rows_frame`). Along the way:

- **one run per key**: cells that train the same thing (equal :attr:`Cell.key`, e.g. Dyconex's
  ``lower-lr`` and ``none``, whose lr already is 1e-4) are trained once; a cell whose run is already in
  the run cache (``PROT_LIB_CACHE``, :mod:`prot_lib.training.run_cache`) is read back in this process,
  never sent to a worker;
- **engines**: ``local`` runs the cells in worker processes on this machine with joblib's ``loky``
  backend, one process per core (``n_jobs``), one torch thread each
  (:func:`~prot_lib.experiments.runtime.one_thread_per_worker`); ``dask`` sends each cell to a Dask
  distributed cluster (:mod:`prot_lib.experiments.dask_engine`): a ``LocalCluster`` when no address is
  given, else the running scheduler at ``scheduler`` (``tcp://host:8786``), so the same call scales to
  clusters started by dask-jobqueue (Slurm, PBS), dask-kubernetes or ``dask ssh``. One cell, or
  ``n_jobs=1``, runs in this process; so does, when ``n_jobs`` is not given, a local sweep of fewer
  than :data:`PARALLEL_MIN_STEPS` optimizer steps in all: starting a worker process costs seconds
  (importing torch and Lightning), more than such a sweep would gain;
- **resume**: with ``out``, each cell's result is written to ``<out>/cells/<key>.json`` by this
  process the moment it arrives (atomically), and a later call finds it there and does not train it
  again: an interrupted sweep resumes where it stopped. A stored result counts only if the code that
  made it is this code (its ``source`` fingerprint; the key includes it too);
- **progress**: a tqdm bar counts cells done (stored cells count as done from the start).

Where a cell ran is in its rows (``worker``: ``host:pid`` for local workers, the Dask worker's address
for ``dask``), and how long it took (``wall_s``).

Environment defaults (for the notebooks and the book build): ``PROT_LIB_ENGINE`` (``local``),
``PROT_LIB_JOBS`` (every core), ``PROT_LIB_SCHEDULER`` (an address for ``dask``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import joblib
import pandas as pd
from tqdm.auto import tqdm

from ..training import run_cache
from ..utils.io import atomic_write_text
from .cells import Cell, rows_frame, run_cell
from .runtime import one_thread_per_worker

__all__ = ["ENGINES", "PARALLEL_MIN_STEPS", "CellStore", "run_cells", "default_jobs", "estimated_steps"]

#: the engines :func:`run_cells` knows
ENGINES = ("local", "dask")
#: with ``n_jobs`` not given, a local sweep estimated below this many optimizer steps (all cells and
#: folds together; about a minute of training on one core at ~20 ms a step) runs in the calling process
PARALLEL_MIN_STEPS = 3000
#: optimizer steps per epoch assumed for the estimate when a cell trains whole epochs (Ishigami's 25,
#: the most of a shipped config)
_STEPS_PER_EPOCH_ESTIMATE = 25


class CellStore:
    """Finished cells on disk: ``<root>/cells/<key>.json``, one JSON object per cell
    (:func:`~prot_lib.experiments.cells.cell_result`; NaN and infinity as JSON's ``NaN``/``Infinity``
    tokens, which Python's ``json`` reads back exactly).

    Args:
        root: the sweep's output folder (``--out``).
    """

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self.folder = self.root / "cells"

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        """The stored result of ``key``, or None when there is none, it is unreadable (a foreign or
        damaged file) or it was made by other code (its ``source`` is not this library's)."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            res = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        if res.get("key") != key or res.get("source") != run_cache.source_fingerprint():
            return None
        return res

    def save(self, result: Mapping[str, Any]) -> Path:
        """Write one cell's result (atomically: an interrupted write leaves no half file)."""
        return atomic_write_text(self.path(result["key"]), json.dumps(result, indent=1))

    def keys(self) -> List[str]:
        """Keys of every stored cell."""
        return sorted(p.stem for p in self.folder.glob("*.json")) if self.folder.is_dir() else []


def default_jobs() -> int:
    """``$PROT_LIB_JOBS``, else every core this process may use."""
    env = os.environ.get("PROT_LIB_JOBS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def estimated_steps(task: Mapping[str, Any]) -> int:
    """Optimizer steps a cell will train (an upper estimate when it trains whole epochs)."""
    per_fold = task["max_steps"] if task["max_steps"] > 0 else \
        task["config"]["training"]["max_epochs"] * _STEPS_PER_EPOCH_ESTIMATE
    return int(per_fold) * len(task["folds"])


def _in_run_cache(task: Mapping[str, Any]) -> bool:
    """The cell's run is stored in the run cache (its key is the run cache's key)."""
    return bool(task.get("cache_dir")) and (Path(task["cache_dir"]) / f"{task['key']}.pt").is_file()


def _worker_entry(task: Mapping[str, Any]) -> Dict[str, Any]:
    """A cell in a worker process: one thread, then :func:`run_cell`."""
    one_thread_per_worker()
    return run_cell(task)


def _run_local(tasks: List[Mapping[str, Any]], n_jobs: int, on_result: Callable[[Dict[str, Any]], None]) -> None:
    if n_jobs == 1 or len(tasks) == 1:  # no worker to start: train here (a notebook's one-cell sweep)
        for task in tasks:
            on_result(run_cell(task))
        return
    parallel = joblib.Parallel(n_jobs=min(n_jobs, len(tasks)), backend="loky", return_as="generator_unordered",
                               batch_size=1, pre_dispatch="all")
    for result in parallel(joblib.delayed(_worker_entry)(t) for t in tasks):
        on_result(result)


def run_cells(cells: Sequence[Cell], *, engine: Optional[str] = None, scheduler: Optional[str] = None,
              n_jobs: Optional[int] = None, out: Union[str, Path, None] = None, progress: Optional[bool] = None,
              desc: str = "cells", known: Optional[Mapping[str, Mapping[str, Any]]] = None) -> pd.DataFrame:
    """Run ``cells`` and return their rows (:func:`~prot_lib.experiments.cells.rows_frame`).

    Args:
        cells: the sweep's cells (:func:`~prot_lib.experiments.cells.grid_cells`).
        engine: "local" or "dask" (default ``$PROT_LIB_ENGINE``, else "local").
        scheduler: for "dask": the address of a running scheduler (default ``$PROT_LIB_SCHEDULER``; none:
            a ``LocalCluster`` of ``n_jobs`` single-threaded worker processes, closed afterwards).
        n_jobs: worker processes of the local engine or the LocalCluster (default :func:`default_jobs`;
            a local sweep of fewer than :data:`PARALLEL_MIN_STEPS` steps then runs in this process).
        out: folder for the per-cell results (:class:`CellStore`); None: keep nothing on disk.
        progress: show a tqdm bar of cells done (default: only on a terminal).
        desc: the bar's label.
        known: results already in hand, {key: :func:`~prot_lib.experiments.cells.cell_result`}, used
            instead of training (e.g. a chapter's run sliced to the cell's folds).

    Returns:
        the rows, in the order of ``cells``.

    Raises:
        ValueError: unknown ``engine``.
        RuntimeError: a worker ran other code than this process (its source fingerprint differs).
        Whatever a cell raises (e.g. ``DataError``); cells finished before it are already stored.
    """
    engine = engine or os.environ.get("PROT_LIB_ENGINE") or "local"
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    n_jobs_given = n_jobs or (os.environ.get("PROT_LIB_JOBS") or None)
    n_jobs = n_jobs or default_jobs()
    store = CellStore(out) if out is not None else None
    results: Dict[str, Dict[str, Any]] = {k: dict(v) for k, v in (known or {}).items()}
    tasks: Dict[str, Dict[str, Any]] = {}
    for cell in cells:
        key = cell.key
        if key in results or key in tasks:
            continue
        stored = store.load(key) if store is not None else None
        if stored is not None:
            results[key] = stored
        else:
            tasks[key] = cell.task()
    unique = len(results) + len(tasks)
    source = run_cache.source_fingerprint()
    bar = tqdm(total=unique, initial=unique - len(tasks), desc=desc, unit="cell",
               disable=(None if progress is None else not progress))

    def on_result(result: Dict[str, Any]) -> None:
        if result.get("source") != source:
            raise RuntimeError(f"worker {result.get('worker')} ran prot_lib source {result.get('source')}, this "
                               f"process has {source}: install the same version of prot_lib on every worker")
        results[result["key"]] = result
        if store is not None:
            store.save(result)
        bar.update(1)

    try:
        todo = []
        for task in tasks.values():
            if _in_run_cache(task):  # read back here: no worker to start, no training
                on_result(run_cell(task))
            else:
                todo.append(task)
        if todo:
            if engine == "local" and n_jobs_given is None and sum(map(estimated_steps, todo)) < PARALLEL_MIN_STEPS:
                n_jobs = 1
            if engine == "dask":
                from . import dask_engine  # distributed takes ~3 s to import: only when asked for

                dask_engine.run(todo, on_result, scheduler=scheduler or os.environ.get("PROT_LIB_SCHEDULER"),
                                n_workers=n_jobs)
            else:
                _run_local(todo, n_jobs, on_result)
    finally:
        bar.close()
    return rows_frame(cells, results)

