"""The notebooks: committed clean, shaped like a chapter, and they run (their asserts are tests).

Fast checks read the committed files. ``test_executes`` runs each chapter with papermill and the
CI parameters (``CI = True`` injected after the ``parameters`` cell), within PROT_LIB_NB_TIMEOUT
seconds (default 600); the executed copies are reused by test_book.py and test_browser.py.
"""

import pytest

pytest.register_assert_rewrite("nbutils")  # before the import: its asserts report values too
from nbutils import (
    REQUIRED_HEADINGS,
    all_notebooks,
    assigned_names,
    chapter_notebooks,
    first_code_cell,
    ids,
    missing_headings,
    read_notebook,
)

pytest_plugins = ["nbutils"]

CHAPTERS = chapter_notebooks()
NOTEBOOKS = all_notebooks()


def test_there_are_chapters():
    assert CHAPTERS, "no notebooks/[0-9]*.ipynb: the book has no chapters"


# --- committed notebooks are clean -------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_committed_without_outputs(path):
    nb = read_notebook(path)
    dirty = [
        i for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} have outputs or execution counts; commit notebooks cleared "
        "(e.g. `jupyter nbconvert --clear-output --inplace notebooks/*.ipynb`)"
    )
    assert "widgets" not in nb.metadata, f"{path.name}: stored widget state in metadata; clear it"
    assert "papermill" not in nb.metadata, f"{path.name}: is a papermill output, not a source"


# --- every chapter has the same shape ---------------------------------------------------------


@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_first_code_cell_is_parameters_with_CI(path):
    cell = first_code_cell(read_notebook(path))
    assert cell is not None, f"{path.name}: no code cell"
    assert "parameters" in cell.metadata.get("tags", []), (
        f"{path.name}: the first code cell must be tagged `parameters` (papermill injects CI after it)"
    )
    assert "CI" in assigned_names(cell.source), f"{path.name}: the parameters cell must set `CI = False`"


@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_follows_chapter_skeleton(path):
    missing = missing_headings(read_notebook(path))
    assert not missing, (
        f"{path.name}: missing headings {missing}; every chapter has, in this order: "
        f"{' ... '.join(REQUIRED_HEADINGS)} (see docs/CHAPTER_GUIDE.md)"
    )


# --- every chapter runs -----------------------------------------------------------------------


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_executes(path, notebook_runner):
    result = notebook_runner.run(path)
    assert result.ok, result.message


# --- thin notebooks, static pages without stale progress bars ----------------------------------

#: the longest code cell a chapter may hold (issue 10: logic belongs in prot_lib, not in a cell)
MAX_CELL_LINES = 25
#: library calls that show a tqdm bar unless told not to; frozen on a static page it reads "5% 1/19"
PROGRESS_CALLS = {"run_kfold", "run_cells", "fix_matrix", "stability_map", "clip_sweep", "ablation_sweep"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_code_cells_are_short(path):
    long = {i: len(c.source.splitlines()) for i, c in enumerate(read_notebook(path).cells)
            if c.cell_type == "code" and len(c.source.splitlines()) > MAX_CELL_LINES}
    assert not long, f"{path.name}: code cells longer than {MAX_CELL_LINES} lines (cell: lines): {long}"


@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_engine_calls_show_no_progress_bar(path):
    import ast

    bad = []
    for i, cell in enumerate(read_notebook(path).cells):
        if cell.cell_type != "code":
            continue
        source = "\n".join(ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                kw = {k.arg: k.value for k in node.keywords}
                if name in PROGRESS_CALLS and not (isinstance(kw.get("progress"), ast.Constant)
                                                   and kw["progress"].value is False):
                    bad.append(f"cell {i} line {node.lineno}: {name}(...)")
    assert not bad, f"{path.name}: pass progress=False (a bar freezes on the built page): {bad}"
