"""The sweep engine: an interrupted sweep resumes without retraining finished cells; a real Dask cluster
(a ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1) runs a quick sweep through
``python -m prot_lib sweep ... --engine dask --scheduler ADDRESS``, and its rows equal those of the
local engine's worker processes, value for value.

Cells are one Ishigami fold of a few optimizer steps; the run cache is off, so every cell trains.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from prot_lib.__main__ import main as cli
from prot_lib.experiments import engine as engine_mod
from prot_lib.experiments import grid_cells, load_spec, run_cells, spec_cells

#: columns that say where and how fast a cell ran, not what it computed
WHERE = ["worker", "wall_s"]


@pytest.fixture(autouse=True)
def _no_run_cache(monkeypatch):
    monkeypatch.delenv("PROT_LIB_CACHE", raising=False)


def _cells():
    return grid_cells("ishigami", lrs=[1e-3, 2e-2], settings=["none", "norm 1"], folds=[0], max_steps=3)


def test_an_interrupted_sweep_resumes_without_retraining_finished_cells(tmp_path, monkeypatch):
    cells = _cells()
    keys = [c.key for c in cells]
    trained = []
    real_run_cell = engine_mod.run_cell

    def interrupted_after_two(task):
        if len(trained) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third cell
        trained.append(task["key"])
        return real_run_cell(task)

    monkeypatch.setattr(engine_mod, "run_cell", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_cells(cells, n_jobs=1, out=tmp_path, progress=False)
    stored = sorted(p.stem for p in (tmp_path / "cells").glob("*.json"))
    assert stored == sorted(keys[:2]) and not list((tmp_path / "cells").glob(".*.tmp"))

    trained.clear()
    monkeypatch.setattr(engine_mod, "run_cell", lambda task: (trained.append(task["key"]), real_run_cell(task))[1])
    resumed = run_cells(cells, n_jobs=1, out=tmp_path, progress=False)
    assert trained == keys[2:]  # only the two cells that had not finished
    assert sorted(p.stem for p in (tmp_path / "cells").glob("*.json")) == sorted(keys)

    fresh = run_cells(cells, n_jobs=1, progress=False)  # no store: every cell trained now
    pd.testing.assert_frame_equal(resumed.drop(columns=WHERE), fresh.drop(columns=WHERE))
    assert len(trained) == 2 + 4


def test_a_stored_cell_of_other_code_is_trained_again(tmp_path, monkeypatch):
    cells = _cells()[:1]
    run_cells(cells, n_jobs=1, out=tmp_path, progress=False)
    path = tmp_path / "cells" / f"{cells[0].key}.json"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "source": "0000000000000000"}))  # made by another version
    trained = []
    real_run_cell = engine_mod.run_cell
    monkeypatch.setattr(engine_mod, "run_cell", lambda task: (trained.append(task["key"]), real_run_cell(task))[1])
    run_cells(cells, n_jobs=1, out=tmp_path, progress=False)
    assert trained == [cells[0].key] and json.loads(path.read_text())["source"] == stored["source"]


def test_small_sweeps_and_cached_runs_stay_in_this_process(tmp_path, monkeypatch):
    here = f"{socket.gethostname()}:{os.getpid()}"
    cells = _cells()
    assert sum(engine_mod.estimated_steps(c.task()) for c in cells) == 4 * 3 < engine_mod.PARALLEL_MIN_STEPS
    assert (run_cells(cells, progress=False)["worker"] == here).all()  # n_jobs not given: no worker started
    monkeypatch.setenv("PROT_LIB_CACHE", str(tmp_path / "cache"))
    run_cells(cells[:2], n_jobs=1, progress=False)  # fills the run cache
    mixed = run_cells(cells, n_jobs=2, progress=False)  # asks for workers: only the uncached cells go there
    assert (mixed["worker"].iloc[:2] == here).all() and (mixed["worker"].iloc[2:] != here).all()
    whole = grid_cells("ishigami", fixes=["none"], folds=None)[0]  # 5 folds x 10 epochs x ~25 steps
    assert engine_mod.estimated_steps(whole.task()) == 5 * 10 * 25


# ------------------------------------------------------------------------------ a real Dask cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, procs) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{what}: a process exited early: {dead}")
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


@pytest.fixture
def dask_cluster(tmp_path):
    """``python -m dask scheduler`` + two ``python -m dask worker --nthreads 1`` on 127.0.0.1, free ports;
    yields (scheduler address, {worker address}); every process is stopped afterwards."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"{n}.log", "w") for n in ("scheduler", "worker0", "worker1")]
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=logs[0], stderr=subprocess.STDOUT, env=env)]
    try:
        for i in (0, 1):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dask", "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                 "--nworkers", "1", "--no-dashboard", "--name", f"test-worker-{i}", "--death-timeout", "120"],
                stdout=logs[i + 1], stderr=subprocess.STDOUT, env=env))
        holder = {}

        def two_workers():
            try:
                with Client(address, timeout=5) as client:
                    holder["workers"] = set(client.scheduler_info()["workers"])
                return len(holder["workers"]) == 2
            except OSError:
                return False

        _wait_for(two_workers, 180, "dask cluster", procs)
        yield address, holder["workers"]
    finally:
        for p in reversed(procs):  # workers first, then the scheduler
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()


def test_a_quick_sweep_runs_on_a_dask_cluster_and_equals_the_local_engine(dask_cluster, tmp_path, capsys):
    address, workers = dask_cluster
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "stability-map", "description": "two lrs x two clip settings, one fold",
        "bases": {"ishigami": {"folds": [0]}}, "lrs": [1e-3, 2e-2, 5e-2], "settings": ["none", "norm 1"],
        "max_steps": 40,
        "quick": {"lrs": [1e-3, 2e-2], "max_steps": 4},  # what --quick runs: 4 cells of 4 steps
    }))
    out_dask = tmp_path / "dask"
    assert cli(["sweep", str(spec), "--quick", "--engine", "dask", "--scheduler", address, "--out", str(out_dask),
                "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "sweep tiny (quick)" in report and "4 cells, 4 fold runs, engine dask" in report

    cells = spec_cells(load_spec(spec, quick=True))
    assert len(cells) == 4 and all(c.max_steps == 4 for c in cells)
    stored = [json.loads((out_dask / "cells" / f"{c.key}.json").read_text()) for c in cells]
    ran_on = {s["worker"] for s in stored}
    assert ran_on <= workers, (ran_on, workers)  # every cell ran on one of the two cluster workers
    rows_dask = pd.read_csv(out_dask / "rows.csv")
    assert set(rows_dask["worker"]) == ran_on and len(rows_dask) == 4

    local = run_cells(cells, engine="local", n_jobs=2, progress=False)  # two loky worker processes
    assert not set(local["worker"]) & workers and (local["worker"] != f"{socket.gethostname()}:{os.getpid()}").all()
    dask_rows = run_cells(cells, out=out_dask, progress=False)  # read back from the store, nothing trained
    assert set(dask_rows["worker"]) == ran_on
    pd.testing.assert_frame_equal(dask_rows.drop(columns=WHERE), local.drop(columns=WHERE))
    assert local["max_loss"].notna().all() and local["n_steps"].eq(4).all()
