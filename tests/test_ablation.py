"""prot_lib.experiments.ablation: the recommended configuration's variants, their cells, and the table.

Trainings are a few optimizer steps of one fold in this process (``n_jobs=1``), run cache off.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest

from prot_lib.experiments import ablation_configs, ablation_sweep, ablation_table, load_spec, recommended_config, spec_cells
from prot_lib.experiments.ablation import NEUTRAL, PARTS, flatten_keys
from prot_lib.training import ConfigError, reproduction_config


@pytest.fixture(autouse=True)
def _no_run_cache(monkeypatch):
    monkeypatch.delenv("PROT_LIB_CACHE", raising=False)


def test_flatten_keys():
    assert flatten_keys({"a": {"b": 1, "c": {"d": None}}, "e": [1]}) == {"a.b": 1, "a.c.d": None, "e": [1]}


def test_variants_switch_exactly_one_part():
    v = ablation_configs("ishigami")
    rec, repro = recommended_config("ishigami"), reproduction_config("ishigami")
    assert list(v) == (["recommended"] + [f"without {p}" for p in PARTS] + [f"{p} alone" for p in PARTS]
                       + ["reproduction"])
    # every variant runs to its end: the fail-fast switches are off everywhere
    assert all(c.training.on_nonfinite == "continue" and c.training.data_guard is False for c in v.values())
    assert (v["recommended"].training.lr, v["recommended"].model.norm, v["recommended"].training.gradient_clip_val,
            v["recommended"].training.warmup.enabled) == (rec.training.lr, "layernorm", 1.0, True)
    assert v["recommended"].to_dict()["model"] == rec.to_dict()["model"]
    # left out: that part's keys take the reproduction's values, the others stay recommended
    assert v["without clip"].training.gradient_clip_val is None and v["without clip"].model.norm == "layernorm"
    assert v["without lr"].training.lr == repro.training.lr == 2e-2 and v["without lr"].training.warmup.enabled
    assert v["without postnorm"].model.norm is None and v["without postnorm"].training.lr == 3e-3
    # alone: the reproduction plus that part
    assert v["lr alone"].training.lr == 3e-3 and v["lr alone"].model.norm is None
    assert v["lr alone"].training.gradient_clip_val is None and not v["lr alone"].training.warmup.enabled
    assert v["warmup alone"].training.warmup.total_iters == 50 and v["warmup alone"].training.lr == 2e-2
    assert v["reproduction"].to_dict()["training"] == {**repro.to_dict()["training"], "on_nonfinite": "continue",
                                                       "data_guard": False}
    assert v["reproduction"].name == "ishigami_ablation_reproduction"


def test_extra_variants_start_from_the_reproduction_or_the_recommendation():
    v = ablation_configs("ishigami", parts=["clip"], extra={"lr 1e-2 alone": {"training.lr": 1e-2},
                                                             "rec x3": {"from": "recommended", "training.lr": 9e-3}})
    assert list(v) == ["recommended", "without clip", "clip alone", "reproduction", "lr 1e-2 alone", "rec x3"]
    assert (v["lr 1e-2 alone"].training.lr, v["lr 1e-2 alone"].model.norm) == (1e-2, None)
    assert (v["rec x3"].training.lr, v["rec x3"].model.norm, v["rec x3"].training.gradient_clip_val) == (9e-3, "layernorm", 1.0)
    with pytest.raises(ConfigError, match="unknown ablation parts"):
        ablation_configs("ishigami", parts=["dropout"])
    with pytest.raises(ConfigError, match="from: 'elsewhere'"):
        ablation_configs("ishigami", extra={"x": {"from": "elsewhere"}})
    with pytest.raises(ConfigError, match="training.lrr"):
        ablation_configs("ishigami", extra={"x": {"training.lrr": 1.0}})


def test_dyconex_lr_part_carries_its_longer_schedule():
    v = ablation_configs("dyconex")
    assert "normalize" in [k.split()[0] for k in v if k.endswith("alone")]
    assert (v["lr alone"].training.lr, v["lr alone"].training.max_epochs) == (3e-3, 10)
    assert v["without normalize"].data.normalize is False and v["without normalize"].training.mask_missing_targets is False


def test_the_shipped_spec_builds_one_cell_per_variant_seed_and_fold():
    spec = load_spec("ablation")
    cells = spec_cells(spec)
    assert set(spec.variants) == set(ablation_configs("ishigami", spec.parts, spec.extra)) - {"reproduction"}
    assert len(cells) == len(spec.variants) * len(spec.seeds) * 5 == 110
    assert {c.labels["dataset"] for c in cells} == {"ishigami"}
    assert [c.labels["fix"] for c in cells[::10]] == spec.variants  # in the spec's order, seeds x folds each
    margin = [c for c in cells if c.labels["fix"] == "recommended at lr 1e-2"][0].config
    assert margin.training.lr == 1e-2 and margin.model.norm == "layernorm" and margin.training.gradient_clip_val == 1.0
    assert len({c.key for c in cells}) == len(cells)  # no two cells train the same run
    quick = spec_cells(load_spec("ablation", quick=True))
    assert [c.labels["fix"] for c in quick] == ["recommended", "reproduction"] and quick[0].max_steps == 25


def test_sweep_rows_and_table_read_the_folds_fates():
    rows = ablation_sweep("ishigami", seeds=[0], folds=[1], variants=["recommended", "reproduction"], max_steps=25,
                          n_jobs=1, progress=False)
    assert rows["variant"].tolist() == ["recommended", "reproduction"]
    assert rows["lr"].tolist() == [3e-3, 2e-2] and (rows["fold"] == 1).all()
    table = ablation_table(rows)
    assert table.index.tolist() == ["recommended", "reproduction"]
    for variant, r in rows.set_index("variant").iterrows():
        assert table.loc[variant, "n_folds"] == 1
        assert math.isfinite(r["rmse_ratio"])  # one epoch: one validation
        assert table.loc[variant, "median_rmse_ratio"] == pytest.approx(r["rmse_ratio"])


def test_table_counts_dead_folds_as_failures_not_as_missing():
    rows = pd.DataFrame({
        "fix": ["a"] * 4 + ["b"] * 3, "lr": [1e-3] * 4 + [2e-2] * 3,
        "fate": ["finite", "finite", "dead", "blown_up", "dead", "dead", "finite"],
        "rmse_ratio": [0.5, 0.7, math.nan, 9.0, math.nan, math.nan, 0.2],
        "nonfinite": [False, False, True, False, True, True, False],
    })
    t = ablation_table(rows)
    assert t.loc["a", ["n_folds", "nonfinite", "dead", "blown_up"]].tolist() == [4, 1, 1, 1]
    assert t.loc["a", "median_rmse_ratio"] == pytest.approx(0.7 + (9.0 - 0.7) / 2)  # 0.5, 0.7, 9, inf
    assert t.loc["a", "median_rmse_ratio_live"] == pytest.approx(0.6)
    assert t.loc["a", "worst_rmse_ratio_live"] == pytest.approx(0.7)
    assert t.loc["b", "median_rmse_ratio"] == math.inf  # two of three folds dead
    assert t.loc["b", "median_rmse_ratio_live"] == pytest.approx(0.2)


def test_ship_sweep_writes_the_finished_cells_and_says_how_many(tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    from prot_lib.experiments import run_sweep

    spec_path = Path(__file__).resolve().parents[1] / "scripts" / "ship_sweep.py"
    mod = importlib.util.spec_from_file_location("ship_sweep", spec_path)
    ship = importlib.util.module_from_spec(mod)
    mod.loader.exec_module(ship)
    assert ship.main(["ablation", "--quick", "--from", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    run_sweep("ablation", quick=True, n_jobs=1, out=tmp_path / "sweep", progress=False)
    assert ship.main(["ablation", "--quick", "--from", str(tmp_path / "sweep"), "--out", str(tmp_path / "abl")]) == 0
    rows = pd.read_csv(tmp_path / "abl.csv")
    meta = json.loads((tmp_path / "abl.json").read_text())
    assert rows["variant"].tolist() == ["recommended", "reproduction"] and "fix" not in rows and "worker" not in rows
    assert (meta["cells_done"], meta["cells_total"], meta["missing"]) == (2, 2, [])
    assert ablation_table(rows).loc["recommended", "n_folds"] == 1


def test_the_shipped_ablation_is_the_whole_spec():
    import json
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "data" / "sweeps"
    rows = pd.read_csv(data / "ishigami_ablation_seeds0-1.csv")
    meta = json.loads((data / "ishigami_ablation_seeds0-1.json").read_text())
    spec = load_spec("ablation")
    assert meta["cells_done"] == meta["cells_total"] == len(spec_cells(spec)) == len(rows) == 110
    assert rows["variant"].drop_duplicates().tolist() == spec.variants
    assert rows.groupby("variant").size().eq(10).all() and sorted(rows["seed"].unique()) == [0, 1]
    assert meta["spec"]["extra"] == spec.model_dump()["extra"] and meta["spec"]["parts"] == spec.parts
    t = ablation_table(rows)
    assert t.loc["recommended", "nonfinite"] == 0 and t.loc["clip alone", "dead"] == 7  # what chapter 9 states


def test_the_shipped_prenorm_ablation_is_its_whole_spec():
    import json
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "data" / "sweeps"
    rows = pd.read_csv(data / "ishigami_ablation_prenorm_seeds0-1.csv")
    meta = json.loads((data / "ishigami_ablation_prenorm_seeds0-1.json").read_text())
    spec = load_spec("ablation-prenorm")
    assert meta["cells_done"] == meta["cells_total"] == len(spec_cells(spec)) == len(rows) == 20
    assert rows["variant"].drop_duplicates().tolist() == spec.variants
    assert meta["spec"]["extra"] == spec.model_dump()["extra"]
    assert not [w for w in meta["command"].split() if w.startswith("/")]  # no machine paths, only the repo's
    # the variants are what their labels say: the norm before each block with a residual, nothing else changed
    v = ablation_configs("ishigami", spec.parts, spec.extra)
    pre, rec = v["recommended with pre-norm"], v["recommended"]
    assert (pre.model.norm_position, pre.model.residual, rec.model.norm_position) == ("pre", True, None)
    assert pre.training == rec.training and v["pre-norm alone"].training == v["reproduction"].training
    t = ablation_table(rows)
    assert t.loc["pre-norm alone", "nonfinite"] == 0 and t.loc["pre-norm alone", "median_rmse_ratio"] < 0.6
