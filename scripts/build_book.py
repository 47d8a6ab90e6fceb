"""Build the book: execute every chapter notebook once, then render the executed copies.

    python scripts/build_book.py --mode full             # the book as published (full training runs)
    python scripts/build_book.py --mode ci               # CI parameters: fast runs, same pages
    python scripts/build_book.py --mode ci --only 03_    # execute only notebooks whose name contains "03_"
    python scripts/build_book.py --mode ci --jobs 1      # one notebook at a time (default: 2 on 2+ cores)
    python scripts/build_book.py --vendor-only           # only install and copy the browser libraries

The three steps, each a function below:

1. ``vendor``: ``npm ci`` in ``book/vendor/`` (versions pinned by its package-lock.json), then copy
   require.js, the jupyter-widgets html-manager (``embed-amd.js`` and its fonts) and MathJax 3, each
   next to its licence, into ``book/_vendor/vendor/`` (gitignored). ``html_extra_path`` in
   ``book/_config.yml`` publishes that folder as ``_build/html/vendor/``; ``nb_ipywidgets_js`` and
   ``mathjax_path`` point at it, so no page loads a script from a CDN. ``offline.js`` (from
   book/vendor/jupyter-widgets-offline.js) points embed-amd.js at its fonts and lets ipywidgets'
   MathJax 2 calls reach MathJax 3.
2. ``execute_all``: papermill runs ``notebooks/[0-9]*.ipynb`` into ``book/chapters/`` (gitignored),
   one subprocess per notebook with a wall-clock timeout, ``--jobs N`` at once (default
   ``$PROT_LIB_BOOK_JOBS``, else min(2, cores)), each kernel on one core when N > 1, longest chapter
   first by the times the last build of this mode wrote to ``book/_timings/<mode>.json``
   (``{"mode", "jobs", "wall_s", "started_at", "chapters_sum_s", "chapters": {name: {"seconds", "ok",
   "start_s", "end_s"}}}``; before any build, :data:`SHIPPED_SECONDS`). The chapters share the run cache
   (``$PROT_LIB_CACHE``), whose entries are written atomically, so two kernels training the same run
   at once both store a whole, identical entry. In ``ci`` mode it injects
   ``{"CI": True}`` after the cell tagged ``parameters``; in ``full`` mode it injects nothing, so the
   notebook's own ``CI = False`` holds. nbclient stores the widget state in the notebook metadata,
   which MyST-NB embeds in the page so the static widgets render. A notebook that fails is kept as
   ``book/chapters/NAME.failed.ipynb`` (traceback inside; excluded from the book) and nothing is
   rendered, unless ``--keep-going``.
3. ``render``: ``jupyter-book build book/`` with ``execute_notebooks: off`` (set in _config.yml), so
   nothing runs twice. ``book/_toc.yml`` globs ``chapters/*``: a chapter that was not executed is
   simply absent, and a new notebook needs no toc edit. Warnings are errors (``-W --keep-going``).

The tests import this file (``tests/nbutils.py``) and reuse ``execute_notebook``, ``stage_book`` and
``render``, so the tests build the book exactly as this script does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from prot_lib.training.ledger import LEDGER_ENV, read_ledger, summarize_ledger

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
BOOK = REPO / "book"
CHAPTER_GLOB = "[0-9]*.ipynb"  # chapters are the numbered notebooks; notebooks/widgets/ etc. are not
KERNEL_NAME = "python3"  # resolved to this interpreter, see check_kernel()

# Seconds one notebook may run, wall clock (papermill's own timeout is per cell), when it runs
# alone; with --jobs N, N times that (a kernel then has one core, and a chapter may train the runs
# that a later chapter, run alone, would have read from the cache: 09 timed out at 600 s in a
# `--jobs 2` CI build on a loaded machine, having trained chapters 1, 2 and 8's runs itself).
TIMEOUT = {"ci": 600, "full": 3600}

# --- 1. vendor ------------------------------------------------------------------------------------

VENDOR_SRC = BOOK / "vendor"  # package.json, package-lock.json, node_modules/ (ignored)
VENDOR_OUT = BOOK / "_vendor" / "vendor"  # -> _build/html/vendor/ through html_extra_path

MIT_REQUIREJS = """\
RequireJS {version} (https://github.com/requirejs/requirejs)
Copyright jQuery Foundation and other contributors, https://jquery.org/

The npm package ships no licence file; its header and package.json say MIT.
Full text (https://github.com/requirejs/requirejs/blob/master/LICENSE):

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

# The files each page needs, relative to node_modules, and where they go under VENDOR_OUT.
# (target dir, npm package, [globs inside the package], {licence file name: source in node_modules})
VENDORED = [
    ("requirejs", "requirejs", ["require.js"], {}),
    # embed-amd.js bundles @jupyter-widgets/base, controls and output, so built-in widgets load
    # without any further request; its webpack publicPath is the script's own folder, which is
    # where the Font Awesome fonts it references must sit.
    (
        "jupyter-widgets",
        "@jupyter-widgets/html-manager",
        ["dist/embed-amd.js", "dist/*.woff2", "dist/*.woff", "dist/*.ttf", "dist/*.eot", "dist/*.svg"],
        {
            # html-manager ships no licence file; it is the ipywidgets monorepo's BSD-3-Clause
            # licence, which its dependency @jupyter-widgets/base7 (same repository) ships.
            "LICENSE": "@jupyter-widgets/base7/LICENSE",
            "THIRD_PARTY_NOTICES.txt": "@jupyter-widgets/html-manager/dist/embed.js.LICENSE.txt",
            "LICENSE.fontawesome.txt": "@fortawesome/fontawesome-free/LICENSE.txt",
        },
    ),
    # MathJax 3 (not 4: MathJax 4 fetches its fonts from a CDN). The combined file Sphinx loads,
    # plus the folders it loads lazily from its own location: fonts (output/chtml/fonts), TeX
    # extensions (input/tex/extensions), the menu (ui/) and the accessibility tools (a11y/, sre/).
    # The other combined files (tex-svg.js, ...) are left out: nothing loads them.
    (
        "mathjax",
        "mathjax",
        ["es5/tex-mml-chtml.js", "es5/input/**/*", "es5/output/**/*", "es5/ui/**/*",
         "es5/a11y/**/*", "es5/sre/**/*", "es5/adaptors/**/*"],
        {"LICENSE": "mathjax/LICENSE"},
    ),
]


def _npm_ci_needed() -> bool:
    """True when node_modules is missing or older than the lock file."""
    stamp = VENDOR_SRC / "node_modules" / ".package-lock.json"  # written by npm ci/install
    lock = VENDOR_SRC / "package-lock.json"
    return not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime


def vendor(*, force_npm: bool = False) -> Path:
    """Install the pinned npm packages and copy what the pages load into VENDOR_OUT.

    Returns VENDOR_OUT. Raises RuntimeError if npm is missing or ``npm ci`` fails.
    """
    if force_npm or _npm_ci_needed():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm not found: install Node.js >= 18 (Debian: apt-get install -y npm)")
        print("[vendor] npm ci in book/vendor/", flush=True)
        subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=VENDOR_SRC, check=True
        )
    modules = VENDOR_SRC / "node_modules"
    if VENDOR_OUT.exists():
        shutil.rmtree(VENDOR_OUT)
    for target, package, globs, licences in VENDORED:
        pkg_dir = modules / package
        meta = json.loads((pkg_dir / "package.json").read_text())
        out = VENDOR_OUT / target
        for pattern in globs:
            matches = [p for p in pkg_dir.glob(pattern) if p.is_file()]
            if not matches:
                raise RuntimeError(f"[vendor] {package}: nothing matches {pattern!r}")
            # dist/x.js -> x.js, es5/a/b.js -> a/b.js: drop the package's build folder
            strip = pkg_dir / pattern.split("/")[0] if "/" in pattern else pkg_dir
            for src in matches:
                dst = out / src.relative_to(strip)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        for name, src in licences.items():
            shutil.copy2(modules / src, out / name)
        if package == "requirejs":
            (out / "LICENSE").write_text(MIT_REQUIREJS.format(version=meta["version"]))
        if target == "jupyter-widgets":
            # ours: sets embed-amd's asset path, bridges ipywidgets' MathJax 2 calls to MathJax 3
            shutil.copy2(VENDOR_SRC / "jupyter-widgets-offline.js", out / "offline.js")
        (out / "VERSION").write_text(f"{package} {meta['version']} ({meta.get('license')})\n")
    print(f"[vendor] copied into {VENDOR_OUT.relative_to(REPO)}", flush=True)
    return VENDOR_OUT


# --- 2. execute -----------------------------------------------------------------------------------


def chapter_notebooks(only: str | None = None) -> list[Path]:
    """The chapter notebooks, ``notebooks/[0-9]*.ipynb`` sorted, optionally filtered by substring."""
    paths = sorted(NOTEBOOKS.glob(CHAPTER_GLOB))
    if only:
        paths = [p for p in paths if only in p.name]
    return paths


def check_kernel() -> None:
    """Make sure kernel ``python3`` runs this interpreter (the venv), not a user-global one.

    jupyter_client swaps an argv[0] of ``python`` for ``sys.executable`` of the process that starts
    the kernel; papermill runs in a subprocess of this interpreter, so that is the venv's python.
    Raises RuntimeError naming the kernelspec if it would start another interpreter.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel as exc:
        raise RuntimeError(
            f"no kernelspec {KERNEL_NAME!r}: run `{sys.executable} -m pip install ipykernel`"
        ) from exc
    exe = spec.argv[0]
    if exe not in {"python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"}:
        if Path(exe).resolve() != Path(sys.executable).resolve():
            raise RuntimeError(
                f"kernelspec {KERNEL_NAME!r} ({spec.resource_dir}) starts {exe}, not {sys.executable}; "
                f"run `{sys.executable} -m ipykernel install --sys-prefix` or remove that kernelspec"
            )


def kernel_env(*, one_thread: bool = False) -> dict[str, str]:
    """Environment for papermill and its kernel: this venv's kernelspecs first, quiet debugger.

    one_thread: the kernel computes on one core (set when several chapters run at once, so that N
    kernels on N cores do not each start a pool of N threads): OpenMP and MKL (torch's intra-op
    pool reads ``OMP_NUM_THREADS`` at start-up, and prot_lib's numba scan sizes its pool by
    ``torch.get_num_threads()``), numba's own pool, and the sweep engine's worker count
    (``PROT_LIB_JOBS``, :func:`prot_lib.experiments.engine.default_jobs`) unless the caller set it.
    """
    env = dict(os.environ)
    env["JUPYTER_PREFER_ENV_PATH"] = "1"  # sys.prefix/share/jupyter before ~/.local/share/jupyter
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # ipykernel's debugger warns about frozen modules
    env.pop("MPLBACKEND", None)  # e.g. Agg from a CI environment would keep figures off the pages
    # Chapters re-use the same shipped runs (chapter 1's reproduction is chapter 4's baseline): with a
    # cache folder, prot_lib.training.run_kfold computes each (config, folds, source hash) once.
    env.setdefault("PROT_LIB_CACHE", str(REPO / "runs" / "cache"))
    env.setdefault("PROT_LIB_PROGRESS", "0")  # Lightning's progress bars would fill the pages
    if one_thread:
        for var in THREAD_VARS:
            env[var] = "1"
        env.setdefault("PROT_LIB_JOBS", "1")
    return env


#: thread-pool sizes a kernel reads from its environment (torch via OpenMP, MKL, numba)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


@dataclass
class ExecResult:
    """What one papermill run did. ``message`` says where and why it failed ('' when ok).

    seconds: wall clock of the run. started, ended: ``time.time()`` (seconds since the epoch) when
    papermill was started and when it exited or was killed. training: what the chapter trained, from
    its ledger (:func:`prot_lib.training.ledger.summarize_ledger`: ``train_s``, ``fold_runs``,
    ``steps``, ``ms_per_step``, ``cached_runs``, ``cached_s``), None when no ledger was kept.
    """

    source: Path
    output: Path
    ok: bool
    seconds: float
    message: str = ""
    started: float = 0.0
    ended: float = 0.0
    training: dict | None = None


def _first_error(nb_path: Path) -> str:
    """'cell N: Name: value' for the first error output in an executed notebook ('' if none)."""
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, ValueError):
        return ""
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                src = "".join(cell.get("source", ""))
                head = src.strip().splitlines()[:3]
                return (
                    f"cell {i} ({' / '.join(head)[:200]}): "
                    f"{out.get('ename')}: {out.get('evalue')}"
                )
    return ""


# papermill processes running now (several at once with --jobs), so that an interrupt of the build
# kills them all: each runs in a session of its own, where the terminal's Ctrl-C does not reach.
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set by an interrupted execute_all: a papermill started late dies at once


def execute_notebook(src: Path, dst: Path, *, ci: bool, timeout: float,
                     one_thread: bool = False, ledger: Path | None = None) -> ExecResult:
    """Run ``src`` with papermill into ``dst``; the kernel's working directory is ``src``'s folder.

    ci: inject ``CI = True`` after the ``parameters`` cell. timeout: seconds, wall clock, for the
    whole notebook; on expiry papermill and its kernel are killed and the result says so.
    one_thread: the kernel uses one core (:func:`kernel_env`). Safe to call from several threads.
    ledger: a file that every k-fold run of the chapter appends one line to (``PROT_LIB_LEDGER``,
    :mod:`prot_lib.training.ledger`; emptied first); its summary becomes ``result.training``.
    """
    check_kernel()
    dst.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "papermill", str(src), str(dst),
        "--kernel", KERNEL_NAME,
        "--cwd", str(src.parent),
        "--no-progress-bar",
        "--log-level", "WARNING",
    ]
    if ci:
        cmd += ["--parameters_yaml", json.dumps({"CI": True})]
    env = kernel_env(one_thread=one_thread)
    if ledger is not None:
        ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger.unlink(missing_ok=True)
        env[LEDGER_ENV] = str(ledger)
    started, start = time.time(), time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,  # its own process group, so a timeout can kill papermill + kernel
    )
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
        if _STOPPING.is_set():
            _kill_tree(proc)
    try:
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            proc.communicate()
            seconds = time.monotonic() - start
            where = _last_started_cell(dst)
            return ExecResult(src, dst, False, seconds,
                              f"{src.name}: timed out after {timeout:.0f} s{where}", started, time.time())
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    seconds, ended = time.monotonic() - start, time.time()
    training = summarize_ledger(read_ledger(ledger)) if ledger is not None else None
    if proc.returncode != 0:
        error = _first_error(dst) or log.strip()[-3000:]
        return ExecResult(src, dst, False, seconds, f"{src.name} failed: {error}", started, ended, training)
    return ExecResult(src, dst, True, seconds, "", started, ended, training)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill papermill and every descendant (the kernel runs in a session of its own)."""
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or process gone: the group kill below still applies
        children = []
    for child in children:
        try:
            child.kill()
        except Exception:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_started_cell(nb_path: Path) -> str:
    """' in cell N (first line)' for the cell papermill marked running, from the saved notebook."""
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, ValueError):
        return ""
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("metadata", {}).get("papermill", {}).get("status") == "running":
            first = "".join(cell.get("source", "")).strip().splitlines()[:1]
            return f" in cell {i} ({first[0][:120] if first else ''})"
    return ""


# --- 2b. scheduling and timings -------------------------------------------------------------------

# The order in which chapters start, when no build of this mode has recorded its times yet:
# seconds per chapter, keyed by the chapter's number (the file name's digits before "_").
# full: the fresh-clone `make book` of 23907df (2026-12-01; 2 at a time, one thread each, load 3-5), except
# 01, 04, 09 and 10, estimated since they read their long sweeps from data/sweeps/ (the CI-mode runs
# of their live re-runs plus the folds full mode adds).
# ci: `PROT_LIB_BOOK_JOBS=1 make book MODE=ci` on 2 cores shared with other jobs (load 5-7),
# 2026-12-01, 1921 s in all. Only the order matters: the times are slower than an idle machine's.
SHIPPED_SECONDS = {
    "full": {"00": 21, "01": 120, "02": 28, "03": 164, "04": 400, "05": 113, "06": 95, "07": 214,
             "08": 55, "09": 700, "10": 420, "11": 715},
    "ci": {"00": 29, "01": 219, "02": 89, "03": 94, "04": 298, "05": 152, "06": 192, "07": 189,
           "08": 78, "09": 353, "10": 129, "11": 98},
}
TIMINGS_DIR = BOOK / "_timings"  # gitignored; outside _build/, which render() deletes


def timings_path(mode: str) -> Path:
    """``book/_timings/<mode>.json``: the last measured seconds per chapter of this mode."""
    return TIMINGS_DIR / f"{mode}.json"


def default_jobs() -> int:
    """``$PROT_LIB_BOOK_JOBS``, else min(2, the cores this process may use).

    Raises ValueError: ``$PROT_LIB_BOOK_JOBS`` is not a whole number >= 1.
    """
    env = os.environ.get("PROT_LIB_BOOK_JOBS")
    if env:
        if not env.strip().isdigit() or int(env) < 1:
            raise ValueError(f"PROT_LIB_BOOK_JOBS={env!r}: expected a whole number >= 1")
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, cores))


def load_timings(path: Path) -> dict[str, float]:
    """{notebook file name: seconds} from a timings file ({} if it is missing or unreadable)."""
    try:
        record = json.loads(Path(path).read_text())
        return {name: float(c["seconds"]) for name, c in record.get("chapters", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def schedule(notebooks: list[Path], recorded: dict[str, float],
             fallback: dict[str, float] | None = None) -> list[Path]:
    """``notebooks`` in the order to start them: longest expected run first.

    The expected seconds of a chapter are ``recorded[file name]``, else ``fallback[number]`` (the
    digits before the first "_"); a chapter with neither goes first (it may be long, and a new
    chapter is the one being worked on). Ties keep file-name order. With N workers, longest first
    keeps a long chapter from starting last and running alone at the end.
    """
    fallback = fallback or {}

    def expected(nb: Path) -> float:
        if nb.name in recorded:
            return recorded[nb.name]
        return float(fallback.get(nb.name.split("_", 1)[0], float("inf")))

    return sorted(notebooks, key=lambda nb: (-expected(nb), nb.name))


def write_timings(path: Path, *, mode: str, jobs: int, wall_s: float, t0: float,
                  results: list[ExecResult]) -> dict:
    """Write this build's record to ``path`` (atomically) and return it.

    ``{"mode", "jobs", "wall_s", "started_at", "chapters_sum_s", "chapters": {name: {"seconds", "ok",
    "start_s", "end_s"[, "training"]}}}`` (``training``: :attr:`ExecResult.training`, where kept); started_at is ``t0`` (``time.time()`` at the build's start) in UTC, and
    start_s/end_s are seconds after it.
    Chapters recorded earlier and not run now are kept (a ``--only`` build updates its own), except
    a failed run's seconds never lower an earlier record (a failure cuts a run short).
    """
    try:
        old = json.loads(Path(path).read_text()).get("chapters", {})
    except (OSError, ValueError, AttributeError):
        old = {}
    chapters = dict(old) if isinstance(old, dict) else {}
    for r in results:
        seconds = r.seconds
        prev = chapters.get(r.source.name, {})
        if not r.ok and isinstance(prev, dict) and isinstance(prev.get("seconds"), (int, float)):
            seconds = max(seconds, prev["seconds"])
        chapters[r.source.name] = {"seconds": round(seconds, 1), "ok": r.ok,
                                   "start_s": round(r.started - t0, 1), "end_s": round(r.ended - t0, 1)}
        if r.training is not None:
            chapters[r.source.name]["training"] = r.training
    record = {"mode": mode, "jobs": jobs, "wall_s": round(wall_s, 1),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
              "chapters_sum_s": round(sum(r.seconds for r in results), 1),
              "chapters": dict(sorted(chapters.items()))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
    return record


def execute_all(notebooks: list[Path], dest: Path, *, mode: str, timeout: float | None = None,
                prune: bool = True, jobs: int = 1, timings: Path | None = None) -> list[ExecResult]:
    """Execute ``notebooks`` into ``dest`` (same file names), ``jobs`` at a time, longest first.

    Returns one result each, in the order of ``notebooks``. Each chapter prints one line when it
    finishes. jobs > 1: every kernel computes on one core (:func:`kernel_env`); the chapters share
    the run cache, whose writes are atomic (:mod:`prot_lib.training.run_cache`). timings: the file
    that orders the chapters (:func:`schedule`, falling back on :data:`SHIPPED_SECONDS`) and that
    receives this run's times (:func:`write_timings`); None: :func:`timings_path` of ``mode``. Each
    chapter's ledger goes to ``ledger/<mode>/<chapter>.jsonl`` beside that file.

    A notebook that fails is kept, with its traceback, as ``dest/NAME.failed.ipynb``, which
    _config.yml excludes from the book; the others still run. prune: first delete executed
    notebooks in ``dest`` whose source is gone from notebooks/.

    Raises ValueError: jobs < 1. On an interrupt (Ctrl-C) every running papermill is killed.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    timeout = TIMEOUT[mode] * min(jobs, max(1, len(notebooks))) if timeout is None else timeout
    timings = timings_path(mode) if timings is None else Path(timings)
    dest.mkdir(parents=True, exist_ok=True)
    if prune:
        sources = {p.stem for p in NOTEBOOKS.glob(CHAPTER_GLOB)}
        for stale in dest.glob("*.ipynb"):
            if stale.name.removesuffix(".ipynb").removesuffix(".failed") not in sources:
                stale.unlink()
    order = schedule(notebooks, load_timings(timings), SHIPPED_SECONDS.get(mode))
    jobs = min(jobs, len(order)) or 1
    print(f"[execute] {len(order)} notebook(s), {mode} mode, {jobs} at a time, longest first: "
          + ", ".join(nb.name.split("_", 1)[0] for nb in order), flush=True)

    def finished(res: ExecResult) -> None:
        failed_copy = dest / f"{res.source.stem}.failed.ipynb"
        line = f"[execute] {res.source.name} ({mode}) {'ok' if res.ok else 'FAILED'} in {res.seconds:.1f} s"
        if not res.ok:
            if res.output.exists():
                res.output.replace(failed_copy)
                res.output = failed_copy
            shown = failed_copy.relative_to(REPO) if failed_copy.is_relative_to(REPO) else failed_copy
            line += f"\n    {res.message}\n    traceback in {shown}"
        print(line, flush=True)

    for src in order:
        (dest / f"{src.stem}.failed.ipynb").unlink(missing_ok=True)
    t0, start = time.time(), time.monotonic()
    done: dict[Path, ExecResult] = {}
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="papermill")
    try:
        # submitted in schedule order; the pool starts them in that order as workers free up
        futures = {pool.submit(execute_notebook, src, dest / src.name, ci=(mode == "ci"), timeout=timeout,
                               one_thread=jobs > 1, ledger=timings.parent / "ledger" / mode / f"{src.stem}.jsonl"): src
                   for src in order}
        pending = set(futures)
        while pending:
            ready, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(ready, key=lambda f: futures[f].name):
                res = fut.result()
                finished(res)
                done[futures[fut]] = res
    except BaseException:  # Ctrl-C or a bug: no papermill may outlive the build
        _STOPPING.set()
        pool.shutdown(wait=False, cancel_futures=True)
        with _RUNNING_LOCK:
            for proc in list(_RUNNING):
                _kill_tree(proc)
        raise
    finally:
        pool.shutdown(wait=True)
        _STOPPING.clear()
    results = [done[src] for src in notebooks]
    write_timings(timings, mode=mode, jobs=jobs, wall_s=time.monotonic() - start, t0=t0, results=results)
    return results


# --- 3. render ------------------------------------------------------------------------------------

# What a book source folder needs besides the chapters: everything tracked in book/ except tooling.
STAGE_SKIP = {"_build", "chapters", "vendor", "_vendor", "_timings"}


def stage_book(chapters: Path, dest: Path) -> Path:
    """Make ``dest`` a book source folder: book/'s pages and config, ``chapters`` as its chapters.

    Used by the tests to build from notebooks executed into a temporary folder, leaving book/
    untouched. Files are copied, _vendor/ and chapters/ are symlinked. Returns ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for item in BOOK.iterdir():
        if item.name in STAGE_SKIP or item.name.startswith("."):
            continue
        target = dest / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    for name, src in (("_vendor", BOOK / "_vendor"), ("chapters", chapters)):
        link = dest / name
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        link.symlink_to(src.resolve(), target_is_directory=True)
    return dest


def render(book_dir: Path = BOOK, *, strict: bool = True) -> Path:
    """``jupyter-book build book_dir`` (HTML into book_dir/_build/html). Returns that folder.

    strict: ``-W --keep-going``, every Sphinx warning fails the build after listing them all.
    Raises RuntimeError if the build fails or no vendored files are present.
    """
    if not (book_dir / "_vendor" / "vendor").is_dir():
        raise RuntimeError(f"{book_dir}/_vendor/vendor missing: run `python scripts/build_book.py --vendor-only`")
    if not any((book_dir / "chapters").glob("*.ipynb")):
        raise RuntimeError(f"no executed notebooks in {book_dir}/chapters: nothing to build")
    cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(book_dir), "--builder", "html"]
    if strict:
        cmd += ["-W", "--keep-going"]
    # From scratch: an incremental Sphinx build would keep the pages of chapters that are gone.
    shutil.rmtree(book_dir / "_build", ignore_errors=True)
    print(f"[render] jupyter-book build {book_dir}", flush=True)
    proc = subprocess.run(cmd, env=kernel_env(), capture_output=True, text=True)
    html = book_dir / "_build" / "html"
    if proc.returncode != 0 or not (html / "index.html").exists():
        raise RuntimeError(f"jupyter-book build failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return html


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["full", "ci"], default="full",
                        help="full: the notebooks' own parameters; ci: inject CI=True (fast)")
    parser.add_argument("--only", metavar="PATTERN",
                        help="execute only notebooks whose file name contains PATTERN; "
                             "chapters executed earlier stay in book/chapters/ and are built too")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="execute up to N notebooks at once, each kernel on one core when N > 1 "
                             "(default: $PROT_LIB_BOOK_JOBS, else min(2, cores))")
    parser.add_argument("--timeout", type=float,
                        help="seconds per notebook (default: ci 600, full 3600, times the notebooks run at once)")
    parser.add_argument("--no-execute", action="store_true", help="render book/chapters/ as it is")
    parser.add_argument("--vendor-only", action="store_true", help="only install/copy the JS libraries")
    parser.add_argument("--no-strict", action="store_true", help="do not turn Sphinx warnings into errors")
    parser.add_argument("--keep-going", action="store_true",
                        help="render the book even if a notebook failed (it is left out; exit code 1)")
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    vendor()
    if args.vendor_only:
        return 0
    failed = []
    if not args.no_execute:
        notebooks = chapter_notebooks(args.only)
        if not notebooks:
            print(f"no notebooks/{CHAPTER_GLOB} matches {args.only!r}", file=sys.stderr)
            return 2
        jobs = default_jobs() if args.jobs is None else args.jobs
        if jobs < 1:
            parser.error(f"--jobs must be >= 1, got {jobs}")
        t_start = time.monotonic()
        results = execute_all(notebooks, BOOK / "chapters", mode=args.mode, timeout=args.timeout, jobs=jobs)
        failed = [r for r in results if not r.ok]  # in chapter order
        wall = time.monotonic() - t_start
        print(f"[execute] {len(results) - len(failed)}/{len(results)} ok: wall {wall:.1f} s, sum of chapter "
              f"times {sum(r.seconds for r in results):.1f} s ({min(jobs, len(results))} at a time; "
              f"per chapter: {timings_path(args.mode).relative_to(REPO)})", flush=True)
        for r in failed:
            print(f"[execute] FAILED {r.message}", file=sys.stderr)
        if failed and not args.keep_going:
            print("[execute] not rendering (--keep-going renders the other chapters)", file=sys.stderr)
            return 1
    t1 = time.monotonic()
    html = render(BOOK, strict=not args.no_strict)
    print(f"[render] {html.relative_to(REPO)}/index.html in {time.monotonic() - t1:.1f} s "
          f"(total {time.monotonic() - t0:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
