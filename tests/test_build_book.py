"""scripts/build_book.py's executor: N notebooks at once, longest first, failures kept, times recorded.

The notebooks here are tiny fakes written into tmp_path (a ``time.sleep`` or a ``raise``), run by the
same papermill subprocess as the book's chapters. Overlap is read from each run's recorded start and
end times (who started before whom ended), never from how long anything took.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

from nbutils import build_book

# papermill starts a kernel per notebook: a few seconds each on a loaded machine
TIMEOUT = 300.0


def write_notebook(folder: Path, name: str, *sources: str) -> Path:
    """A notebook ``folder/name`` whose code cells are ``sources``."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / name
    nbformat.write(nb, path)
    return path


# the kernel prints what it was told about threads, so a test can read it from the executed copy
REPORT_ENV = ("import os; print('threads', os.environ.get('OMP_NUM_THREADS'), "
              "os.environ.get('NUMBA_NUM_THREADS'), os.environ.get('PROT_LIB_JOBS'))")


def stream_text(nb_path: Path) -> str:
    nb = nbformat.read(nb_path, as_version=4)
    return "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", [])
                   if out.get("output_type") == "stream")


def overlap(a, b) -> bool:
    """The two runs' [started, ended] intervals intersect: each started before the other ended."""
    return a.started < b.ended and b.started < a.ended


@pytest.fixture
def no_thread_env(monkeypatch):
    """The test process sets none of the thread variables, so a kernel's values come from the build."""
    for var in (*build_book.THREAD_VARS, "PROT_LIB_JOBS", "PROT_LIB_BOOK_JOBS"):
        monkeypatch.delenv(var, raising=False)


def test_jobs_2_runs_two_at_once_on_one_thread_each(tmp_path, no_thread_env):
    src = tmp_path / "src"
    src.mkdir()
    nbs = [write_notebook(src, f"{i:02d}_sleep.ipynb", REPORT_ENV, "import time; time.sleep(2)") for i in (0, 1)]
    results = build_book.execute_all(nbs, tmp_path / "out", mode="ci", timeout=TIMEOUT, prune=False, jobs=2,
                                     timings=tmp_path / "timings.json")
    assert [r.ok for r in results] == [True, True], [r.message for r in results]
    assert [r.source for r in results] == nbs  # results in chapter order, whatever ran first
    a, b = results
    assert overlap(a, b), f"jobs=2 ran one after the other: {a.started, a.ended} {b.started, b.ended}"
    # two kernels on two cores: each computes on one thread, and the sweep engine on one worker
    assert [stream_text(r.output).strip() for r in results] == ["threads 1 1 1"] * 2
    assert json.loads((tmp_path / "timings.json").read_text())["jobs"] == 2


def test_each_chapter_keeps_a_ledger_of_what_it_trained(tmp_path):
    """The kernel's k-fold runs append to the chapter's ledger (PROT_LIB_LEDGER, set by the build);
    its summary lands in the chapter's timings record."""
    src = tmp_path / "src"
    src.mkdir()
    nb = write_notebook(src, "00_train.ipynb",
                        "from prot_lib.training import reproduction_config\n"
                        "from prot_lib.training.ledger import record_run\n"
                        "cfg = reproduction_config('ishigami')\n"
                        "record_run(cfg, 2, 50, 1.5, cached=False); record_run(cfg, 1, 25, 0.25, cached=True)")
    (res,) = build_book.execute_all([nb], tmp_path / "out", mode="ci", timeout=TIMEOUT, prune=False, jobs=1,
                                    timings=tmp_path / "timings.json")
    assert res.ok, res.message
    want = {"train_s": 1.5, "fold_runs": 2, "steps": 50, "ms_per_step": 30.0, "cached_runs": 1, "cached_s": 0.2}
    assert res.training == want
    assert json.loads((tmp_path / "timings.json").read_text())["chapters"]["00_train.ipynb"]["training"] == want
    assert (tmp_path / "ledger" / "ci" / "00_train.jsonl").is_file()  # beside the timings file


def test_jobs_1_longest_recorded_first_and_a_failure_does_not_stop_the_others(tmp_path, capsys, no_thread_env):
    src = tmp_path / "src"
    src.mkdir()
    nbs = [
        write_notebook(src, "00_quick.ipynb", REPORT_ENV),
        write_notebook(src, "01_boom.ipynb", "x = 1", "raise ValueError('boom in chapter 1')"),
        write_notebook(src, "02_medium.ipynb", "x = 2"),
    ]
    timings = tmp_path / "timings.json"
    timings.write_text(json.dumps({"mode": "ci", "jobs": 1, "wall_s": 9.0, "chapters": {
        "00_quick.ipynb": {"seconds": 1.0, "ok": True},
        "01_boom.ipynb": {"seconds": 5.0, "ok": True},
        "02_medium.ipynb": {"seconds": 3.0, "ok": True},
    }}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "01_boom.failed.ipynb").write_text("{}")  # from an older build: must not survive this one
    results = build_book.execute_all(nbs, out, mode="ci", timeout=TIMEOUT, prune=False, jobs=1, timings=timings)

    by_name = {r.source.name: r for r in results}
    started = [r.source.name for r in sorted(results, key=lambda r: r.started)]
    assert started == ["01_boom.ipynb", "02_medium.ipynb", "00_quick.ipynb"]  # recorded 5 s, 3 s, 1 s
    runs = sorted(results, key=lambda r: r.started)
    assert all(later.started >= earlier.ended for earlier, later in zip(runs, runs[1:]))  # one at a time
    # alone, a kernel keeps the machine's thread settings (none here)
    assert stream_text(by_name["00_quick.ipynb"].output).strip() == "threads None None None"

    boom = by_name["01_boom.ipynb"]
    assert not boom.ok
    assert "ValueError: boom in chapter 1" in boom.message and "raise ValueError" in boom.message
    assert boom.output == out / "01_boom.failed.ipynb" and boom.output.is_file()
    assert "boom in chapter 1" in boom.output.read_text()  # the traceback is kept
    assert not (out / "01_boom.ipynb").exists()  # excluded from the book
    # the failure came first and the others still ran after it
    assert by_name["00_quick.ipynb"].ok and by_name["02_medium.ipynb"].ok
    assert (out / "00_quick.ipynb").is_file() and (out / "02_medium.ipynb").is_file()

    printed = capsys.readouterr().out.splitlines()
    finish_lines = [ln for ln in printed if ln.startswith("[execute] 0")]
    assert finish_lines == [
        f"[execute] 01_boom.ipynb (ci) FAILED in {boom.seconds:.1f} s",
        f"[execute] 02_medium.ipynb (ci) ok in {by_name['02_medium.ipynb'].seconds:.1f} s",
        f"[execute] 00_quick.ipynb (ci) ok in {by_name['00_quick.ipynb'].seconds:.1f} s",
    ]
    assert "longest first: 01, 02, 00" in printed[0]

    record = json.loads(timings.read_text())
    assert (record["mode"], record["jobs"]) == ("ci", 1)
    assert list(record["chapters"]) == ["00_quick.ipynb", "01_boom.ipynb", "02_medium.ipynb"]
    assert [c["ok"] for c in record["chapters"].values()] == [True, False, True]
    for r in results:
        c = record["chapters"][r.source.name]
        if r.ok:
            assert c["seconds"] == round(r.seconds, 1)
        else:  # a failure cut the run short: its record never drops below the earlier 5.0 s
            assert c["seconds"] == round(max(r.seconds, 5.0), 1)
        assert 0 <= c["start_s"] <= c["end_s"] <= record["wall_s"] + 0.2
    assert record["chapters_sum_s"] == round(sum(r.seconds for r in results), 1)
    assert record["wall_s"] >= max(c["end_s"] for c in record["chapters"].values()) - 0.2


def test_schedule_recorded_then_shipped_then_unknown_first():
    nbs = [Path(f"notebooks/{n}.ipynb") for n in ("00_intro", "01_long", "02_new", "03_mid", "09_big")]
    recorded = {"01_long.ipynb": 50.0, "03_mid.ipynb": 20.0}
    shipped = {"00": 10, "01": 1, "09": 1676}  # recorded beats shipped (01: 50 s, not 1 s)
    order = [p.stem for p in build_book.schedule(nbs, recorded, shipped)]
    assert order == ["02_new", "09_big", "01_long", "03_mid", "00_intro"]
    # nothing known: every chapter is new, file-name order
    assert [p.stem for p in build_book.schedule(nbs, {}, None)] == [p.stem for p in nbs]
    # the shipped full-mode record puts chapter 11 first, then 9 and 10
    chapters = [Path(f"{n:02d}_x.ipynb") for n in range(12)]
    first = [p.name[:2] for p in build_book.schedule(chapters, {}, build_book.SHIPPED_SECONDS["full"])][:3]
    assert first == ["11", "09", "10"]


def test_write_timings_keeps_other_chapters(tmp_path):
    path = tmp_path / "t" / "ci.json"
    R = build_book.ExecResult
    first = [R(Path("00_a.ipynb"), Path("o"), True, 4.04, "", 100.0, 104.04),
             R(Path("01_b.ipynb"), Path("o"), True, 7.0, "", 100.5, 107.5)]
    rec = build_book.write_timings(path, mode="ci", jobs=2, wall_s=7.6, t0=100.0, results=first)
    assert json.loads(path.read_text()) == rec
    assert rec == {"mode": "ci", "jobs": 2, "wall_s": 7.6, "started_at": "1970-01-01T00:01:40Z",
                   "chapters_sum_s": 11.0, "chapters": {
        "00_a.ipynb": {"seconds": 4.0, "ok": True, "start_s": 0.0, "end_s": 4.0},
        "01_b.ipynb": {"seconds": 7.0, "ok": True, "start_s": 0.5, "end_s": 7.5}}}
    # an --only build of chapter 1 that failed after 2 s: chapter 0 is kept, chapter 1 keeps its 7 s
    again = [R(Path("01_b.ipynb"), Path("o"), False, 2.0, "boom", 200.0, 202.0)]
    rec = build_book.write_timings(path, mode="ci", jobs=1, wall_s=2.1, t0=200.0, results=again)
    assert rec["chapters"]["00_a.ipynb"]["seconds"] == 4.0
    assert rec["chapters"]["01_b.ipynb"] == {"seconds": 7.0, "ok": False, "start_s": 0.0, "end_s": 2.0}
    assert (rec["jobs"], rec["wall_s"], rec["chapters_sum_s"]) == (1, 2.1, 2.0)
    assert build_book.load_timings(path) == {"00_a.ipynb": 4.0, "01_b.ipynb": 7.0}
    assert build_book.load_timings(tmp_path / "missing.json") == {}
    assert [p.name for p in path.parent.iterdir()] == ["ci.json"]  # no temporary file left


def test_default_jobs_and_kernel_env(monkeypatch):
    monkeypatch.setenv("PROT_LIB_BOOK_JOBS", "3")
    assert build_book.default_jobs() == 3
    monkeypatch.setenv("PROT_LIB_BOOK_JOBS", "0")
    with pytest.raises(ValueError, match="PROT_LIB_BOOK_JOBS='0'"):
        build_book.default_jobs()
    monkeypatch.delenv("PROT_LIB_BOOK_JOBS")
    assert build_book.default_jobs() == min(2, len(os.sched_getaffinity(0)))

    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setenv("PROT_LIB_JOBS", "4")  # the caller's choice for the sweeps stands
    env = build_book.kernel_env(one_thread=True)
    assert [env[v] for v in (*build_book.THREAD_VARS, "PROT_LIB_JOBS")] == ["1", "1", "1", "4"]
    assert build_book.kernel_env()["OMP_NUM_THREADS"] == "8"  # one chapter at a time: untouched
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        build_book.execute_all([], Path("unused"), mode="ci", jobs=0)
