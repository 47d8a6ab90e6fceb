"""Project set-up: the dependency lists agree, CI runs the README's test command."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names that differ from PyPI's
CONDA_TO_PYPI = {"pytorch": "torch"}


def _norm(req: str):
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", req)
    name, spec = m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")
    return CONDA_TO_PYPI.get(name, name), spec


def test_environment_yml_matches_pyproject():
    pp = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py = dict(_norm(r) for r in pp["dependencies"])
    for extra in ("test", "book", "bench"):
        py.update(_norm(r) for r in pp["optional-dependencies"][extra])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    conda = {}
    for d in env:
        if isinstance(d, dict):
            conda.update(_norm(r) for r in d["pip"] if not r.startswith("-e"))
        elif not d.startswith(("python=", "pip", "nodejs")):
            conda.update([_norm(d)])
    assert conda == py, {"only in environment.yml": conda.keys() - py.keys(),
                         "only in pyproject": py.keys() - conda.keys(),
                         "different pins": {k for k in conda.keys() & py.keys() if conda[k] != py[k]}}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make book" in readme
    assert re.search(r"^make test$", ci, re.M)


def test_pytest_empty_selection_exits_zero(tmp_path):
    # `pytest -m <marker nobody uses>` selects nothing: the conftest hook turns exit 5 into 0.
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "no_such_marker_selected",
                        str(ROOT / "tests" / "test_project.py")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deselected" in r.stdout


def test_no_run_artefacts_are_tracked():
    # repro bundles, checkpoints and run logs are outputs: a test or a run that wrote one into the
    # repository must not get it committed (the golden reference under data/golden/ is data)
    root = ROOT
    if not (root / ".git").exists():
        pytest.skip("not a git checkout (an sdist): nothing is tracked")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    stray = [f for f in tracked if f.endswith((".pt", ".ckpt")) and not f.startswith("data/golden/")]
    assert stray == [], f"run artefacts tracked by git: {stray}"
