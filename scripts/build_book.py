"""Build the book: execute every chapter notebook once, then render the executed copies.

    python scripts/build_book.py --mode full             # the book as published (full training runs)
    python scripts/build_book.py --mode ci               # CI parameters: fast runs, same pages
    python scripts/build_book.py --mode ci --only 03_    # execute only notebooks whose name contains "03_"
    python scripts/build_book.py --vendor-only           # only install and copy the browser libraries

The three steps, each a function below:

1. ``vendor``: ``npm ci`` in ``book/vendor/`` (versions pinned by its package-lock.json), then copy
   require.js, the jupyter-widgets html-manager (``embed-amd.js`` and its fonts) and MathJax 3, each
   next to its licence, into ``book/_vendor/vendor/`` (gitignored). ``html_extra_path`` in
   ``book/_config.yml`` publishes that folder as ``_build/html/vendor/``; ``nb_ipywidgets_js`` and
   ``mathjax_path`` point at it, so no page loads a script from a CDN. ``offline.js`` (from
   book/vendor/jupyter-widgets-offline.js) points embed-amd.js at its fonts and lets ipywidgets'
   MathJax 2 calls reach MathJax 3.
2. ``execute_all``: papermill runs ``notebooks/[0-9]*.ipynb`` (sorted) into ``book/chapters/``
   (gitignored), one subprocess per notebook with a wall-clock timeout. In ``ci`` mode it injects
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
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
BOOK = REPO / "book"
CHAPTER_GLOB = "[0-9]*.ipynb"  # chapters are the numbered notebooks; notebooks/widgets/ etc. are not
KERNEL_NAME = "python3"  # resolved to this interpreter, see check_kernel()

# Seconds one notebook may run, wall clock (papermill's own timeout is per cell).
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


def kernel_env() -> dict[str, str]:
    """Environment for papermill and its kernel: this venv's kernelspecs first, quiet debugger."""
    env = dict(os.environ)
    env["JUPYTER_PREFER_ENV_PATH"] = "1"  # sys.prefix/share/jupyter before ~/.local/share/jupyter
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # ipykernel's debugger warns about frozen modules
    env.pop("MPLBACKEND", None)  # e.g. Agg from a CI environment would keep figures off the pages
    # Chapters re-use the same shipped runs (chapter 1's reproduction is chapter 4's baseline): with a
    # cache folder, prot_lib.training.run_kfold computes each (config, folds, source hash) once.
    env.setdefault("PROT_LIB_CACHE", str(REPO / "runs" / "cache"))
    env.setdefault("PROT_LIB_PROGRESS", "0")  # Lightning's progress bars would fill the pages
    return env


@dataclass
class ExecResult:
    """What one papermill run did. ``message`` says where and why it failed ('' when ok)."""

    source: Path
    output: Path
    ok: bool
    seconds: float
    message: str = ""


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


def execute_notebook(src: Path, dst: Path, *, ci: bool, timeout: float) -> ExecResult:
    """Run ``src`` with papermill into ``dst``; the kernel's working directory is ``src``'s folder.

    ci: inject ``CI = True`` after the ``parameters`` cell. timeout: seconds, wall clock, for the
    whole notebook; on expiry papermill and its kernel are killed and the result says so.
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
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=kernel_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, so a timeout can kill papermill + kernel
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        proc.communicate()
        seconds = time.monotonic() - start
        where = _last_started_cell(dst)
        return ExecResult(src, dst, False, seconds,
                          f"{src.name}: timed out after {timeout:.0f} s{where}")
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        error = _first_error(dst) or log.strip()[-3000:]
        return ExecResult(src, dst, False, seconds, f"{src.name} failed: {error}")
    return ExecResult(src, dst, True, seconds)


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


def execute_all(notebooks: list[Path], dest: Path, *, mode: str, timeout: float | None = None,
                prune: bool = True) -> list[ExecResult]:
    """Execute ``notebooks`` into ``dest`` (same file names), in order. Returns one result each.

    A notebook that fails is kept, with its traceback, as ``dest/NAME.failed.ipynb``, which
    _config.yml excludes from the book. prune: first delete executed notebooks in ``dest`` whose
    source is gone from notebooks/.
    """
    timeout = TIMEOUT[mode] if timeout is None else timeout
    dest.mkdir(parents=True, exist_ok=True)
    if prune:
        sources = {p.stem for p in NOTEBOOKS.glob(CHAPTER_GLOB)}
        for stale in dest.glob("*.ipynb"):
            if stale.name.removesuffix(".ipynb").removesuffix(".failed") not in sources:
                stale.unlink()
    results = []
    for src in notebooks:
        failed_copy = dest / f"{src.stem}.failed.ipynb"
        failed_copy.unlink(missing_ok=True)
        print(f"[execute] {src.name} ({mode}) ...", end=" ", flush=True)
        res = execute_notebook(src, dest / src.name, ci=(mode == "ci"), timeout=timeout)
        print(f"{'ok' if res.ok else 'FAILED'} in {res.seconds:.1f} s", flush=True)
        if not res.ok:
            if res.output.exists():
                res.output.replace(failed_copy)
                res.output = failed_copy
            print(f"    {res.message}\n    traceback in {failed_copy.relative_to(REPO)}", flush=True)
        results.append(res)
    return results


# --- 3. render ------------------------------------------------------------------------------------

# What a book source folder needs besides the chapters: everything tracked in book/ except tooling.
STAGE_SKIP = {"_build", "chapters", "vendor", "_vendor"}


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
    parser.add_argument("--timeout", type=float, help="seconds per notebook (default: ci 600, full 3600)")
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
        results = execute_all(notebooks, BOOK / "chapters", mode=args.mode, timeout=args.timeout)
        failed = [r for r in results if not r.ok]
        t_exec = time.monotonic() - t0
        print(f"[execute] {len(results) - len(failed)}/{len(results)} ok in {t_exec:.1f} s", flush=True)
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
