"""The built book (CI mode, from the executed notebooks): every page is there and works offline.

The book is built once per session by the ``built_book`` fixture (tests/nbutils.py) into a
temporary folder, exactly as ``scripts/build_book.py --mode ci`` does, but without running any
notebook twice. Set PROT_LIB_BOOK_HTML=book/_build/html to check an existing build instead.
"""

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.register_assert_rewrite("nbutils")  # before the import: its asserts report values too
from nbutils import (
    WIDGET_STATE_MIME,
    calls_clip_explorer,
    chapter_notebooks,
    html_pages,
    read_notebook,
    widget_chapters,
)

pytest_plugins = ["nbutils"]
pytestmark = [pytest.mark.notebooks, pytest.mark.slow]

REMOTE = re.compile(r"^(https?:)?//|\b(cdn\.|cdnjs|unpkg|jsdelivr|googleapis|gstatic)", re.IGNORECASE)
# The attributes through which a page loads something (a plain <a href> does not load anything).
LOADING = {"script": ("src",), "link": ("href",), "img": ("src", "srcset"), "iframe": ("src",),
           "source": ("src", "srcset"), "video": ("src", "poster"), "audio": ("src",),
           "embed": ("src",), "object": ("data",)}
# Script/link attributes that configure where a library fetches from.
CONFIG_ATTRS = ("data-jupyter-widgets-cdn",)

VENDORED = [
    "vendor/requirejs/require.js",
    "vendor/requirejs/LICENSE",
    "vendor/jupyter-widgets/embed-amd.js",
    "vendor/jupyter-widgets/LICENSE",
    "vendor/mathjax/tex-mml-chtml.js",
    "vendor/mathjax/output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff",
    "vendor/mathjax/LICENSE",
]


class _Loads(HTMLParser):
    """Collects (tag, attribute, value) for everything a page loads or configures a fetch with."""

    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value and (name in LOADING.get(tag, ()) or name in CONFIG_ATTRS):
                self.found.append((tag, name, value))


def loads(page: Path) -> list[tuple[str, str, str]]:
    parser = _Loads()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.found


def test_index_and_every_chapter_page_exist(built_book):
    html = built_book.html
    assert (html / "index.html").exists()
    assert (html / "intro.html").exists()
    missing = [nb.stem for nb in chapter_notebooks() if not (html / "chapters" / f"{nb.stem}.html").exists()]
    reasons = "".join(f"\n  {name}: {why}" for name, why in built_book.failed.items())
    assert not missing, f"no page for chapters {missing}{reasons}"


def test_no_page_loads_anything_remote(built_book):
    offenders = []
    for page in html_pages(built_book.html):
        for tag, attr, value in loads(page):
            if REMOTE.search(value):
                offenders.append(f"{page.relative_to(built_book.html)}: <{tag} {attr}={value!r}>")
    assert not offenders, "pages load from the network:\n" + "\n".join(offenders)


def test_no_stylesheet_imports_anything_remote(built_book):
    """Theme CSS could pull web fonts (e.g. @import from fonts.googleapis.com)."""
    pattern = re.compile(r"(@import\s+(url\()?|url\()\s*['\"]?(https?:)?//", re.IGNORECASE)
    offenders = [str(css.relative_to(built_book.html)) for css in built_book.html.rglob("*.css")
                 if pattern.search(css.read_text(encoding="utf-8", errors="replace"))]
    assert not offenders, f"stylesheets fetch remote resources: {offenders}"


@pytest.mark.parametrize("relpath", VENDORED)
def test_vendored_file_is_published(built_book, relpath):
    path = built_book.html / relpath
    assert path.is_file() and path.stat().st_size > 0, (
        f"{relpath} missing from the build: run `python scripts/build_book.py --vendor-only` "
        "(npm ci in book/vendor/, then copy into book/_vendor/)"
    )


def test_pages_use_the_vendored_scripts(built_book):
    """Widget pages load require.js + embed-amd.js from vendor/, math pages MathJax from vendor/."""
    html = built_book.html
    for page in html_pages(html):
        text = page.read_text(encoding="utf-8")
        srcs = [v for tag, attr, v in loads(page) if tag == "script" and attr == "src"]
        where = page.relative_to(html)
        if 'type="application/vnd.jupyter.widget-view+json"' in text:
            for lib in ("vendor/requirejs/require.js", "vendor/jupyter-widgets/embed-amd.js"):
                assert any(lib in s for s in srcs), f"{where}: shows widgets but does not load {lib}"
        if "math notranslate" in text:
            assert any("vendor/mathjax/tex-mml-chtml.js" in s for s in srcs), f"{where}: no local MathJax"


def test_widget_state_is_embedded(built_book):
    """The clip-value explorer's chapter, and every chapter that displayed widgets, carries the
    widget state, so the static page can render the widgets (test_browser.py checks they do).
    """
    clip = [nb.stem for nb in chapter_notebooks() if calls_clip_explorer(read_notebook(nb))]
    assert clip, ("no chapter calls `clip_explorer(`: the book promises the clip-value widget "
                  "(prot_lib.viz.widgets.clip_explorer) in a chapter, e.g. 04_gradient_clipping")
    for stem in sorted(set(clip) | set(widget_chapters(built_book))):
        page = built_book.html / "chapters" / f"{stem}.html"
        assert page.exists(), f"{page.name} missing (did the notebook fail? see test_notebooks)"
        text = page.read_text(encoding="utf-8")
        assert f'type="{WIDGET_STATE_MIME}"' in text, f"{page.name}: no embedded widget state"
        assert 'type="application/vnd.jupyter.widget-view+json"' in text, f"{page.name}: no widget view"


def test_math_is_on_the_pages(built_book):
    """The landing page shows the S6 recurrence; MathJax (test_browser.py) typesets it."""
    text = (built_book.html / "intro.html").read_text(encoding="utf-8")
    assert "math notranslate" in text and r"\exp(\Delta_t A)" in text


def test_executed_chapters_kept_their_outputs(built_book):
    """execute_notebooks is off: the pages show the outputs papermill stored, nothing re-ran."""
    for path in sorted(built_book.executed.glob("*.ipynb")):
        nb = read_notebook(path)
        assert "papermill" in nb.metadata, f"{path.name}: not executed by papermill"
        page = built_book.html / "chapters" / f"{path.stem}.html"
        assert "cell_output" in page.read_text(encoding="utf-8"), f"{page.name}: no cell outputs"
