"""The command line: `python -m prot_lib reproduce|run|data`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prot_lib.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd):
    r = subprocess.run([sys.executable, "-m", "prot_lib", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=600)
    return r


def test_reproduce_dyconex_json_nan_in_epoch_0(tmp_path):
    r = cli("reproduce", "dyconex", "--folds", "0", "--json", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 4, r.stderr  # every fold that ran ended dead
    assert "every fold ended dead" in r.stderr
    records = json.loads(r.stdout)
    assert [rec["fold"] for rec in records] == [0]
    rec = records[0]
    assert rec["first_nonfinite_epoch"] == 0
    assert rec["first_nonfinite_loss_step"] is not None
    assert rec["params_finite_end"] is False
    assert (tmp_path / "run" / "fold0" / "metrics.csv").is_file()


def test_run_config_file_and_bad_config_exit_code(tmp_path):
    good = tmp_path / "tiny.yaml"
    good.write_text("name: tiny\ndata: {name: ishigami}\nmodel: {n_layers: 1, d_model: 4}\n"
                    "training: {max_epochs: 1, k_fold: 3, batch_size: 200}\n")
    r = cli("run", str(good), "--json", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)
    assert len(records) == 3 and all(rec["params_finite_end"] for rec in records)
    assert all(rec["first_nonfinite_loss_step"] is None for rec in records)
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  loss_fn: hinge\n")
    r = cli("run", str(bad), cwd=tmp_path)
    assert r.returncode == 2
    assert "training.loss_fn" in r.stderr and "bad.yaml" in r.stderr


def test_unknown_fix_is_rejected(tmp_path):
    r = cli("reproduce", "ishigami", "--fix", "magic", cwd=tmp_path)
    assert r.returncode == 2 and "invalid choice: 'magic'" in r.stderr


def test_data_regenerate_gives_the_shipped_tensors_bit_for_bit(tmp_path):
    # the CSV text may differ in a float's last bits across libm versions (tests/test_data.py); what
    # the models train on, the float32 tensors, must not
    r = cli("data", "regenerate", "--out", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("ishigami", "dyconex"):
        new, shipped = load_dataset(name, tmp_path), load_dataset(name)
        assert torch.equal(new.x.nan_to_num(123.0), shipped.x.nan_to_num(123.0)), name
        assert torch.equal(torch.isnan(new.x), torch.isnan(shipped.x)), name
        assert torch.equal(new.y.nan_to_num(123.0), shipped.y.nan_to_num(123.0)), name


def test_skip_with_unmasked_nan_labels_says_what_it_dropped_and_exits_4(tmp_path):
    # Normalised Dyconex inputs, but missing labels NOT masked, under skip: every batch holding a missing
    # label has a NaN loss and is dropped; the validation loss is NaN (its labels are missing too), so
    # every fold ends dead. Before: counts only, exit 0.
    cfg = tmp_path / "dy.yaml"
    cfg.write_text("name: dy_skip\ndata: {name: dyconex, normalize: true}\n"
                   "model: {d_model: 8, n_layers: 1, d_state: 4}\n"
                   "training: {k_fold: 2, max_epochs: 1, batch_size: 32, on_nonfinite: skip, "
                   "max_consecutive_skips: 50}\n")
    r = cli("run", str(cfg), "--json", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 4, r.stderr
    records = json.loads(r.stdout)
    assert [rec["fate"] for rec in records] == ["dead", "dead"]
    for rec in records:
        assert rec["n_skipped"] > 0 and rec["val_finite_end"] is False and rec["params_finite_end"] is True
        assert "targets are non-finite" in rec["autopsy_verdict"]
        bundle = Path(rec["bundle"])
        assert bundle == tmp_path / "run" / f"fold{rec['fold']}" / f"nonfinite_step{rec['first_dropped_step']}.pt"
        assert bundle.is_file()
    # the text output names them too
    r = cli("run", str(cfg), "--run-dir", str(tmp_path / "run2"), cwd=tmp_path)
    assert r.returncode == 4, r.stderr
    assert "steps dropped by training.on_nonfinite:" in r.stdout
    assert f"fold 0: {records[0]['n_skipped']} skipped; first at step {records[0]['first_dropped_step']}: " in r.stdout
    assert "python -m prot_lib autopsy " in r.stdout


def test_help_documents_the_exit_codes(tmp_path):
    r = cli("reproduce", "--help", cwd=tmp_path)
    assert r.returncode == 0
    for code, words in ((0, "success"), (2, "bad input"), (3, "non-finite step"), (4, "every fold ended dead")):
        assert f"  {code}  " in r.stdout and words in r.stdout
