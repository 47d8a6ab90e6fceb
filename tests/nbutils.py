"""Helpers shared by test_notebooks.py, test_book.py and test_browser.py.

Each of those modules loads this file as a pytest plugin (``pytest_plugins = ["nbutils"]``), so the
session fixtures below exist once per pytest session: every notebook is executed once (papermill,
CI parameters) and the book is built once, from those executed copies, into a temporary folder.

Environment knobs (all optional):

- ``PROT_LIB_NB_TIMEOUT``: seconds one notebook may run, wall clock (default 600: a chapter under load on 2 shared cores; a hang still fails).
- ``PROT_LIB_BOOK_HTML``: a built book (e.g. ``book/_build/html`` after
  ``python scripts/build_book.py --mode ci``) for test_book/test_browser to check instead of
  executing and building; test_notebooks still executes.
- ``PROT_LIB_SCREENSHOT_DIR``: also save the browser tests' screenshots there (for the README:
  ``book/_build/screenshots``).
- ``PROT_LIB_CHROMIUM``: the Chromium binary (default ``/usr/bin/chromium``).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import os
import re
import shutil
import socket
import sys
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
BOOK = REPO / "book"
CI_TIMEOUT = float(os.environ.get("PROT_LIB_NB_TIMEOUT", "600"))
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"
LIVE_WIDGET_NOTEBOOK = NOTEBOOKS / "widgets" / "clip_explorer.ipynb"

# The chapter skeleton (the project's STYLE.md, docs/CHAPTER_GUIDE.md): What you will learn, The failure, Why it happens,
# The fix, Evidence and limits, Summary. Every chapter must have at least these, in this order.
REQUIRED_HEADINGS = ("What you will learn", "Summary")


def _load_build_book():
    spec = importlib.util.spec_from_file_location("build_book", REPO / "scripts" / "build_book.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_book"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


build_book = _load_build_book()


# --- reading notebooks ----------------------------------------------------------------------------


def chapter_notebooks() -> list[Path]:
    """``notebooks/[0-9]*.ipynb``, sorted: the chapters, exactly as scripts/build_book.py finds them."""
    return build_book.chapter_notebooks()


def all_notebooks() -> list[Path]:
    """Every committed notebook under notebooks/ (chapters and widget demos), sorted."""
    return sorted(p for p in NOTEBOOKS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def ids(paths: list[Path]) -> list[str]:
    """pytest ids: the notebook path relative to notebooks/, without .ipynb."""
    return [p.relative_to(NOTEBOOKS).with_suffix("").as_posix() for p in paths]


@functools.lru_cache(maxsize=None)
def read_notebook(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def markdown_headings(nb) -> list[str]:
    """The text of every markdown heading (``#`` to ``######``), in order; code fences skipped."""
    headings = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        in_fence = False
        for line in cell.source.splitlines():
            if line.lstrip().startswith(("```", "~~~")):
                in_fence = not in_fence
            elif not in_fence and (m := re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)):
                headings.append(m.group(1))
    return headings


def missing_headings(nb) -> list[str]:
    """REQUIRED_HEADINGS not found as headings, in order (a heading may continue: 'Summary and ...')."""
    found = [h.lower() for h in markdown_headings(nb)]
    missing, pos = [], 0
    for wanted in REQUIRED_HEADINGS:
        hit = next((i for i in range(pos, len(found)) if found[i].startswith(wanted.lower())), None)
        if hit is None:
            missing.append(wanted)
        else:
            pos = hit + 1
    return missing


def first_code_cell(nb):
    return next((c for c in nb.cells if c.cell_type == "code"), None)


def assigned_names(source: str) -> set[str]:
    """Names assigned at the top level of ``source`` (``CI = False``, ``CI: bool = False``)."""
    names = set()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def widget_state(nb) -> dict:
    """The widget models nbclient stored in the notebook's metadata ({} if none)."""
    return nb.metadata.get("widgets", {}).get(WIDGET_STATE_MIME, {}).get("state", {})


def calls_clip_explorer(nb) -> bool:
    return any(c.cell_type == "code" and "clip_explorer(" in c.source for c in nb.cells)


# --- executing and building once per session ------------------------------------------------------


class NotebookRunner:
    """Executes each chapter notebook at most once per session, with the CI parameters."""

    def __init__(self, dest: Path, cache: Path):
        self.dest = dest
        # A fresh run cache per test session: chapters share runs with each other, never with older
        # sessions. Set only around the papermill calls, so other tests never read cached runs.
        self.cache = cache
        self.results: dict[str, object] = {}  # name -> build_book.ExecResult

    def run(self, src: Path):
        if src.name not in self.results:
            old = os.environ.get("PROT_LIB_CACHE")
            os.environ["PROT_LIB_CACHE"] = str(self.cache)
            try:
                self.results[src.name] = build_book.execute_notebook(
                    src, self.dest / src.name, ci=True, timeout=CI_TIMEOUT
                )
            finally:
                if old is None:
                    os.environ.pop("PROT_LIB_CACHE", None)
                else:
                    os.environ["PROT_LIB_CACHE"] = old
        return self.results[src.name]


@pytest.fixture(scope="session")
def notebook_runner(tmp_path_factory) -> NotebookRunner:
    return NotebookRunner(tmp_path_factory.mktemp("executed"), tmp_path_factory.mktemp("run_cache"))


@dataclass
class BuiltBook:
    html: Path  # the built site: html/index.html
    executed: Path  # the executed notebooks it was built from
    failed: dict[str, str]  # notebook name -> why it failed (left out of the build)


@pytest.fixture(scope="session")
def built_book(notebook_runner, tmp_path_factory) -> BuiltBook:
    """The book, built in CI mode from the session's executed notebooks, in a temporary folder.

    Notebooks that fail are left out of the build (test_notebooks reports why; test_book then fails
    on their missing page). With PROT_LIB_BOOK_HTML set, that build is checked instead.
    """
    if html := os.environ.get("PROT_LIB_BOOK_HTML"):
        html = Path(html).resolve()
        assert (html / "index.html").exists(), f"PROT_LIB_BOOK_HTML={html} has no index.html"
        return BuiltBook(html, html.parents[1] / "chapters", {})  # <book>/_build/html
    build_book.vendor()
    results = [notebook_runner.run(nb) for nb in chapter_notebooks()]
    chapters = tmp_path_factory.mktemp("chapters")
    failed = {}
    for res in results:
        if res.ok:
            shutil.copy2(res.output, chapters / res.output.name)
        else:
            failed[res.source.name] = res.message
    src = build_book.stage_book(chapters, tmp_path_factory.mktemp("book"))
    return BuiltBook(build_book.render(src), chapters, failed)


def html_pages(html: Path) -> list[Path]:
    """The built pages: every .html except the theme's template macros (_static/) and vendor/."""
    return sorted(p for p in html.rglob("*.html")
                  if not {"_static", "vendor"} & set(p.relative_to(html).parts))


def widget_chapters(book: BuiltBook) -> list[str]:
    """Chapters (stem) whose executed notebook stored widget state; clip_explorer's chapter first."""
    names = []
    for path in sorted(book.executed.glob("*.ipynb")):
        nb = read_notebook(path)
        if widget_state(nb):
            names.append((not calls_clip_explorer(nb), path.stem))
    return [stem for _, stem in sorted(names)]


# --- browser ----------------------------------------------------------------------------------

CHROMIUM = os.environ.get("PROT_LIB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]


def require_chromium() -> str:
    """The Chromium binary; fails (never skips) with the install command when it is missing."""
    path = shutil.which(CHROMIUM) or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if path is None:
        pytest.fail(
            f"Chromium not found at {CHROMIUM}. Install Debian's chromium: "
            "`apt-get update && apt-get install -y chromium` (or set PROT_LIB_CHROMIUM). "
            "Do not run `playwright install`: the tests use the system browser.",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output readable
        pass


@contextlib.contextmanager
def serve(directory: Path):
    """Serve ``directory`` on 127.0.0.1 (free port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class NetworkLog:
    """What the pages asked for that they should not have."""

    blocked: list[str]  # requests to anything but 127.0.0.1, aborted
    failed: list[str]  # local requests that failed or returned >= 400
    errors: list[str]  # uncaught page errors (exceptions in the page's JavaScript)

    def problems(self) -> list[str]:
        return ([f"left 127.0.0.1: {u}" for u in self.blocked]
                + [f"failed: {u}" for u in self.failed]
                + [f"page error: {e}" for e in self.errors])


@pytest.fixture(scope="session")
def playwright_driver():
    """One Playwright driver per session (its sync API allows only one running at a time)."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@contextlib.contextmanager
def offline_browser(pw, tmp_path: Path):
    """A headless Chromium context that may only reach 127.0.0.1; yields (context, NetworkLog).

    pw: the ``playwright_driver`` fixture. Every other request is aborted and recorded, so a test can
    assert none was needed.
    """
    executable = require_chromium()
    log = NetworkLog([], [], [])

    def guard(route):
        url = route.request.url
        if urlparse(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            log.blocked.append(url)
            route.abort()

    def on_response(response):
        if response.status >= 400:
            log.failed.append(f"{response.status} {response.url}")

    def on_failed(request):
        if urlparse(request.url).hostname == "127.0.0.1":
            log.failed.append(f"{request.failure} {request.url}")

    def watch(page):
        page.on("pageerror", lambda e: log.errors.append(f"{page.url}: {e}"))

    context = pw.chromium.launch_persistent_context(
        user_data_dir=str(tmp_path / "chromium-profile"),  # fresh profile per context
        executable_path=executable,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 900},
        service_workers="block",
    )
    try:
        context.route("**/*", guard)
        context.on("response", on_response)
        context.on("requestfailed", on_failed)
        for page in context.pages:
            watch(page)
        context.on("page", watch)
        yield context, log
    finally:
        context.close()


def save_screenshot(page, tmp_path: Path, name: str, *, full_page: bool = True) -> list[Path]:
    """Screenshot into tmp_path (and PROT_LIB_SCREENSHOT_DIR if set). Returns the paths written."""
    paths = [tmp_path / f"{name}.png"]
    if extra := os.environ.get("PROT_LIB_SCREENSHOT_DIR"):
        Path(extra).mkdir(parents=True, exist_ok=True)
        paths.append(Path(extra) / f"{name}.png")
    data = page.screenshot(full_page=full_page)
    for p in paths:
        p.write_bytes(data)
    return paths
