"""docs/findings.md: every table is what scripts/findings_tables.py makes of the JSON in docs/findings/."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("findings_tables", ROOT / "scripts" / "findings_tables.py")
ft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ft)


def test_the_committed_tables_agree_with_their_json():
    text = ft.DOC.read_text()
    assert ft.marked(text) == list(ft.TABLES), "every generated table is marked once, in order"
    assert ft.render(text) == text, "docs/findings.md is stale: run .venv/bin/python scripts/findings_tables.py"
    assert ft.main(["--check"]) == 0


def test_a_changed_record_changes_its_table(tmp_path):
    folder = tmp_path / "findings"
    shutil.copytree(ft.FINDINGS, folder)
    path = folder / "ishigami_none_lr2e-2_seeds0-19.json"
    d = json.loads(path.read_text())
    job = next(j for j in d["jobs"] if j["seed"] == 0 and j["fold"] == 2)
    job["first_nonfinite_loss_step"] = 999
    path.write_text(json.dumps(d))
    assert "| 2 | **999** | **186** | - |" in ft.seed0(folder)
    assert "| 2 | **186** | **186** | - |" in ft.seed0(ft.FINDINGS)


def test_an_unknown_marker_is_an_error():
    with pytest.raises(KeyError, match="'no-such-table'"):
        ft.render("<!-- table: no-such-table -->\n| x |\n<!-- /table -->\n")
