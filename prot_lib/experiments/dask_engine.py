"""The ``dask`` engine of :func:`prot_lib.experiments.engine.run_cells`: each cell is one task on a
Dask distributed cluster.

- No address: a ``distributed.LocalCluster`` of ``n_workers`` worker processes with one thread each
  (``threads_per_worker=1``: a cell sets process-wide torch and numba thread counts, so two cells must
  not share a process), no dashboard, closed when the sweep ends.
- An address (``tcp://host:8786``): the running scheduler there, and whatever workers it has: started
  by hand (``dask scheduler`` / ``dask worker ADDRESS --nthreads 1``), by ``dask ssh``, by
  dask-jobqueue on Slurm/PBS/SGE, or by dask-kubernetes. Workers need this same version of prot_lib
  installed (the engine checks each result's source fingerprint) and nothing else: results travel back
  to this process, which writes them; workers need no shared disk. Start them with ``--nthreads 1``.

Each task is :func:`prot_lib.experiments.cells.run_cell` with one thread, tagged with the address of the
worker that ran it. Tasks are submitted with the cell's key as their Dask key, so a key asked twice
while the first is still held by the cluster is computed once.

Mirrors the pattern of ``distributed.Client.submit`` + ``distributed.as_completed`` (Dask's
documentation, "Futures").
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from distributed import Client, LocalCluster, as_completed, get_worker

from .cells import run_cell
from .runtime import one_thread_per_worker

__all__ = ["run", "dask_task"]


def dask_task(task: Mapping[str, Any]) -> Dict[str, Any]:
    """One cell on a Dask worker: one thread, :func:`run_cell`, and the worker's address as ``worker``."""
    one_thread_per_worker()
    result = run_cell(task)
    result["worker"] = get_worker().address
    return result


def run(tasks: List[Mapping[str, Any]], on_result: Callable[[Dict[str, Any]], None],
        scheduler: Optional[str] = None, n_workers: int = 1) -> None:
    """Run ``tasks`` on a cluster and hand each result to ``on_result`` as soon as it is done.

    Args:
        tasks: :meth:`~prot_lib.experiments.cells.Cell.task` dicts.
        on_result: called in this process, once per finished task, in completion order.
        scheduler: address of a running scheduler; None: a LocalCluster of ``n_workers`` processes.
        n_workers: worker processes of the LocalCluster (ignored with ``scheduler``).

    Raises:
        OSError: no scheduler answers at ``scheduler`` (Dask's connection timeout).
        Whatever a task raised (the remaining tasks are cancelled; finished ones were handed over).
    """
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        # no dashboard; the scheduler's small HTTP server (health checks) on a free port, not 8787
        cluster = LocalCluster(n_workers=max(1, n_workers), threads_per_worker=1, processes=True,
                               dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"})
        client = Client(cluster)
    futures = []
    try:
        futures = [client.submit(dask_task, t, key=f"prot_lib-cell-{t['key']}") for t in tasks]
        for future in as_completed(futures):
            on_result(future.result())
    finally:
        client.cancel([f for f in futures if not f.done()])
        client.close()
        if cluster is not None:
            cluster.close()
