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


def test_the_shipped_warmup_schedules_differ_only_in_their_schedule():
    # chapter 7 compares three files as one experiment: same model, data, lr, seeds, folds and code
    data = ROOT / "data" / "sweeps"
    runs = {tag: json.loads((data / f"ishigami_layers_warmup-{tag}_seeds0-4.json").read_text())
            for tag in ("none", "epoch-literal", "step")}
    assert {r["commit"] for r in runs.values()} == {"5908925"}
    for r in runs.values():
        assert r["args"]["seeds"] == [0, 1, 2, 3, 4] and r["args"]["folds"] == [0, 1, 2, 3, 4]
        assert r["config"]["model"]["topology"] == "layers" and r["config"]["training"]["lr"] == 0.02
        assert len(r["jobs"]) == r["rates"]["p_fold_nonfinite"]["n"] == 25
        # the rate is the jobs' own count: a fold is non-finite when any first non-finite step is set
        assert sum(any(j.get(k) is not None for k in ("first_nonfinite_loss_step", "first_nonfinite_grad_step",
                                                      "first_nonfinite_param_step")) for j in r["jobs"]) \
            == r["rates"]["p_fold_nonfinite"]["k"]
        assert not [w for w in r["command"].split() if w.startswith("/")]
    warm = {tag: r["config"]["training"]["warmup"] for tag, r in runs.items()}
    assert not warm["none"]["enabled"] and warm["step"]["interval"] == "step"
    assert (warm["epoch-literal"]["interval"], warm["epoch-literal"]["total_iters"], warm["epoch-literal"]["step_size"],
            warm["epoch-literal"]["gamma"]) == ("epoch", 5, 10, 0.1)
    strip = lambda cfg: {**cfg, "name": None, "description": None,  # noqa: E731
                         "training": {**cfg["training"], "warmup": None}}
    assert strip(runs["none"]["config"]) == strip(runs["step"]["config"]) == strip(runs["epoch-literal"]["config"])
