"""The build's ledger (prot_lib.training.ledger): one line per k-fold run, trained or read from the cache."""
import pytest

from prot_lib.training import reproduction_config, run_kfold
from prot_lib.training.ledger import LEDGER_ENV, read_ledger, record_run, summarize_ledger


def test_run_kfold_writes_one_line_per_call_trained_then_cached(tmp_path, monkeypatch):
    ledger = tmp_path / "l" / "ch.jsonl"
    monkeypatch.setenv(LEDGER_ENV, str(ledger))
    monkeypatch.setenv("PROT_LIB_CACHE", str(tmp_path / "cache"))
    cfg = reproduction_config("ishigami")
    first = run_kfold(cfg, folds=[0, 1], max_steps=3, progress=False, run_dir=tmp_path / "r1")
    run_kfold(cfg, folds=[0, 1], max_steps=3, progress=False, run_dir=tmp_path / "r2")  # the same run: cached
    df = read_ledger(ledger)
    assert df["cached"].tolist() == [False, True]
    assert df["folds"].tolist() == [2, 2] and df["steps"].tolist() == [6, 6] == [int(first.summary["n_steps"].sum())] * 2
    assert (df["dataset"].iloc[0], df["topology"].iloc[0], df["n_layers"].iloc[0]) == ("ishigami", "stacks", 4)
    s = summarize_ledger(df)
    assert (s["fold_runs"], s["steps"], s["cached_runs"]) == (2, 6, 1)
    assert s["train_s"] == round(float(df["seconds"].iloc[0]), 1) > 0
    assert s["ms_per_step"] == round(1000 * df["seconds"].iloc[0] / 6, 1)


def test_nothing_is_written_without_the_variable_and_a_bad_line_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(LEDGER_ENV, raising=False)
    assert record_run(reproduction_config("dyconex"), 1, 15, 2.0, False) is None
    path = record_run(reproduction_config("dyconex"), 1, 15, 2.0, False, path=tmp_path / "x.jsonl")
    assert summarize_ledger(read_ledger(path)) == {"train_s": 2.0, "fold_runs": 1, "steps": 15, "ms_per_step": 133.3,
                                                   "cached_runs": 0, "cached_s": 0.0}
    assert read_ledger(tmp_path / "missing.jsonl").empty
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(ValueError, match=r"x\.jsonl: line 2 is not JSON"):
        read_ledger(path)
