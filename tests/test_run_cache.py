"""The run cache (prot_lib.training.run_cache): one run is trained once, whoever asks for it next."""
from __future__ import annotations

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch

from prot_lib.data import load_dataset
from prot_lib.training import reproduction_config, run_kfold
from prot_lib.training import run_cache


def test_the_key_ignores_only_the_name_and_description(monkeypatch):
    lower = reproduction_config("dyconex", "lower-lr").to_dict()  # Dyconex's lr already is 1e-4
    base = reproduction_config("dyconex").to_dict()
    assert lower["name"] != base["name"]
    assert run_cache.run_key(lower, [0], 5) == run_cache.run_key(base, [0], 5)
    assert run_cache.run_key(base, [0], 5) != run_cache.run_key(base, [1], 5)
    assert run_cache.run_key(base, [0], 5) != run_cache.run_key(base, [0], 6)
    assert run_cache.run_key(base, [0], 5) != run_cache.run_key(reproduction_config("dyconex", "clip").to_dict(), [0], 5)
    before = run_cache.run_key(base, [0], 5)
    monkeypatch.setattr(run_cache, "source_fingerprint", lambda: "another version")
    assert run_cache.run_key(base, [0], 5) != before  # an entry dies with the code that made it


def test_a_cached_run_is_read_back_with_its_weights_and_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("PROT_LIB_CACHE", str(tmp_path / "cache"))
    cfg = reproduction_config("ishigami")
    first = run_kfold(cfg, folds=[1], max_steps=4, run_dir=tmp_path / "a", progress=False, keep_models=False)
    assert first.models == []  # asked without weights...
    entries = list((tmp_path / "cache").glob("*.pt"))
    assert len(entries) == 1 and entries[0].with_name(entries[0].stem + "_logs").is_dir()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached run was trained again")

    monkeypatch.setattr("prot_lib.training.kfold._run_kfold", no_training)
    again = run_kfold(cfg.updated({"name": "renamed"}), folds=[1], max_steps=4, progress=False)
    assert len(again.models) == 1  # ...but the entry keeps them for whoever asks next
    pd.testing.assert_frame_equal(again.summary, first.summary)
    pd.testing.assert_frame_equal(again.history, first.history)
    assert list(again.run_dir.rglob("metrics.csv")), "a cached run's run_dir holds its CSV logs"
    assert again.config.name == "renamed"  # the caller's config, not the stored one
    weights = again.models[0].state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_no_cache_for_runs_with_their_own_data_or_callbacks(tmp_path, monkeypatch):
    monkeypatch.setenv("PROT_LIB_CACHE", str(tmp_path / "cache"))
    cfg = reproduction_config("ishigami")
    run_kfold(cfg, folds=[0], max_steps=2, data=load_dataset("ishigami"), run_dir=tmp_path / "a", progress=False)
    run_kfold(cfg, folds=[0], max_steps=2, callbacks=[pl.Callback()], run_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.pt"))


@pytest.mark.parametrize("value", ["", None])
def test_caching_is_off_without_the_variable(value, monkeypatch):
    if value is None:
        monkeypatch.delenv("PROT_LIB_CACHE", raising=False)
    else:
        monkeypatch.setenv("PROT_LIB_CACHE", value)
    assert run_cache.cache_dir() is None and run_cache.entry_path({}, [0], -1) is None
