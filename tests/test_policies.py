"""training.on_nonfinite -> NonFiniteGuard: stop (autopsy + repro bundle), skip, rollback; continue and finite
steps unchanged; the first dropped step's verdict and bundle in the run result and the CLI; exit codes."""
import math
import subprocess
import sys

import pandas as pd
import pytest

from prot_lib.__main__ import main
import torch

from prot_lib.callbacks import NonFiniteTrainingError
from prot_lib.diagnostics.autopsy import autopsy, autopsy_bundle, capture_step, load_bundle
from prot_lib.diagnostics.faults import InjectFault
from prot_lib.training import config_from_dict, reproduction_config, run_kfold

TINY = {"name": "tiny", "model": {"d_model": 4, "n_layers": 2, "d_state": 4, "expand": 1},
        "training": {"batch_size": 100, "k_fold": 5, "max_epochs": 1, "gradient_clip_val": None, "lr": 1e-2}}


@pytest.fixture(autouse=True)
def _no_run_cache(monkeypatch):
    monkeypatch.delenv("PROT_LIB_CACHE", raising=False)


def test_defaults_keep_the_writeup_behaviour():
    t = config_from_dict({}).training
    assert t.on_nonfinite == "continue" and t.max_consecutive_skips == 10
    assert t.rollback_every == 1 and t.rollback_lr_factor == 0.5 and t.checkpoint.enabled is False


def test_dyconex_stop_names_embedding_forward_and_the_bundle_replays(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = main(["reproduce", "dyconex", "--folds", "0", "--on-nonfinite", "stop", "--run-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert rc == 3
    assert "first non-finite: forward output of `embedding` (Linear)" in out
    bundle = run_dir / "fold0" / "nonfinite_step0.pt"
    assert f"repro bundle: {bundle}" in out
    snapshot = load_bundle(bundle)
    meta, spec = snapshot["meta"], snapshot["model"]
    assert (meta["fold"], meta["step"], meta["seed"], meta["reasons"]) == (0, 0, 0, ["loss", "grad"])
    # the model travels as class path + constructor arguments (Lightning's hparams) + weights
    assert spec["kind"] == "hparams" and spec["class"] == "prot_lib.training.module:NaNStudyModule"
    cfg = spec["hparams"]["config"]
    assert cfg["training"]["on_nonfinite"] == "stop" and cfg["data"]["name"] == "dyconex"
    assert snapshot["trace_root"] == "model" and snapshot["loss_fn"].__name__ == "mse"
    report = autopsy_bundle(bundle)
    # the NaN came in with the data: the batch holds missing values and the embedding is the first module
    x = snapshot["batch"][0]
    n_bad = int((~x.isfinite()).sum())
    assert n_bad > 0
    assert (report.phase, report.module) == ("forward", "embedding")
    assert report.summary()["nonfinite_in"] == n_bad == report.trace.nonfinite_data["input"]
    assert report.nonfinite_params == []
    printed = out.split("\n", 1)[1].split("\nrepro bundle:")[0]
    assert printed == str(report)
    # a fresh process replays the bundle and prints the same report
    r = subprocess.run([sys.executable, "-m", "prot_lib", "autopsy", str(bundle)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == printed.strip()


def test_rollback_finishes_a_run_that_continue_loses_and_skip_cannot(tmp_path):
    # Ishigami at lr 0.05 (2.5x the shipped reproduction's): fold 0 overflows within its 50 steps
    # (at step 40-45 on our machine, depending on the scan's rounding; the exact step is chaotic).
    # (calibrated on the Vim-style residual stack, topology "layers"; the write-up's stacks diverge sooner)
    base = reproduction_config("ishigami").updated({"training.lr": 0.05, "training.max_epochs": 2,
                                                    "model.topology": "layers", "model.residual": True})
    lost = run_kfold(base, folds=[0], run_dir=tmp_path / "continue", progress=False)
    s = lost.fold_summary(0)
    first = s["first_nonfinite_loss_step"]
    assert first is not None and first < 49 and s["params_finite_end"] is False
    assert s["final_val_rmse"] is None and (lost.history["action"] == "step").all()

    rb = run_kfold(base.updated({"training.on_nonfinite": "rollback"}), folds=[0], run_dir=tmp_path / "rb",
                   progress=False)
    s, h = rb.fold_summary(0), rb.history
    assert s["n_steps"] == 50 and s["params_finite_end"] is True and math.isfinite(s["final_val_rmse"])
    assert s["n_rollbacks"] >= 1 and s["n_skipped"] == 0
    assert h.loc[first, "action"] == "rollback" and h.loc[first, "lr"] == pytest.approx(0.025)
    assert h["params_finite"].all() and h.loc[h.step >= first, "lr"].max() <= 0.025
    assert rb.epochs["val_rmse"].notna().all()
    # before the first non-finite step, rollback trained exactly as continue did
    cols = ["raw_loss", "grad_norm_before_clip", "lr"]
    pd.testing.assert_frame_equal(h.loc[:first - 1, cols], lost.history.loc[:first - 1, cols], check_exact=True)

    # skip drops the same first step and leaves the weights that overflowed in place; whether later
    # batches overflow with them too is chaotic (at step 40 on the chunked torch scan every later batch
    # did, and skip gave up after 5 in a row): both endings are checked for what skip promises
    skip = base.updated({"training.on_nonfinite": "skip", "training.max_consecutive_skips": 5})
    try:
        sk = run_kfold(skip, folds=[0], run_dir=tmp_path / "skip", progress=False)
        hs, gave_up = sk.history, None
    except NonFiniteTrainingError as err:
        hs, gave_up = err.history, err
    assert hs.loc[first, "action"] == "skip" and hs["params_finite"].all()
    assert (hs.loc[hs.action == "skip", "loss_finite"] == False).all()  # noqa: E712  only non-finite steps dropped
    pd.testing.assert_frame_equal(hs.loc[:first - 1, cols], lost.history.loc[:first - 1, cols], check_exact=True)
    if gave_up is not None:
        assert "5 non-finite steps in a row" in str(gave_up) and gave_up.report.phase == "loss"
        assert list(hs["action"].iloc[-4:]) == ["skip"] * 4 and gave_up.bundle_path.is_file()
    else:
        assert sk.fold_summary(0)["n_skipped"] >= 1 and sk.fold_summary(0)["params_finite_end"] is True


def test_armed_guard_changes_nothing_on_finite_steps(tmp_path):
    cfg = config_from_dict(TINY)
    ref = run_kfold(cfg, folds=[0], run_dir=tmp_path / "a", progress=False, max_steps=8).history
    for policy in ("stop", "skip", "rollback"):
        h = run_kfold(cfg.updated({"training.on_nonfinite": policy}), folds=[0], run_dir=tmp_path / policy,
                      progress=False, max_steps=8).history
        pd.testing.assert_frame_equal(h, ref, check_exact=True)


def test_stop_on_a_poisoned_weight_names_its_module(tmp_path):
    cfg = config_from_dict(TINY).updated({"training.on_nonfinite": "stop"})
    name = "model.bimamba.backward_layers.1.out_proj.weight"
    with pytest.raises(NonFiniteTrainingError) as e:
        run_kfold(cfg, folds=[0], run_dir=tmp_path, progress=False,
                  callbacks=[InjectFault(3, "weight", name, float("inf"))])
    rep = e.value.report
    assert (e.value.step, rep.phase, rep.module) == (3, "forward", "bimamba.backward_layers.1.out_proj")
    assert rep.nonfinite_params == [name] and "own parameters" in rep.verdict()
    assert len(e.value.history) == 3


def test_stop_on_a_poisoned_gradient_says_the_replay_is_finite(tmp_path):
    # The fault is planted after backward: replaying the computation cannot meet it, and the report says so.
    cfg = config_from_dict(TINY).updated({"training.on_nonfinite": "stop"})
    with pytest.raises(NonFiniteTrainingError) as e:
        run_kfold(cfg, folds=[0], run_dir=tmp_path, progress=False,
                  callbacks=[InjectFault(2, "grad", "model.head.weight")])
    rep = e.value.report
    assert rep.reasons == ["grad"] and rep.phase == "none" and not rep.reproduced


def test_a_float32_overflow_of_the_norm_alone_is_not_a_nonfinite_step(tmp_path):
    # lr 0.1: within a few steps every gradient is finite, but their total norm (~2e19 and up) squared
    # overflows float32: torch.nn.utils.get_total_norm says inf. The guard sums in float64: no stop there.
    cfg = reproduction_config("ishigami").updated({"training.lr": 0.1, "model.topology": "layers",
                                                   "model.residual": True})
    h = run_kfold(cfg, folds=[0], run_dir=tmp_path / "continue", progress=False, max_steps=10).history
    f32_overflow = h["grad_norm_before_clip"] > math.sqrt(torch.finfo(torch.float32).max)
    first = int(h.loc[f32_overflow, "step"].iloc[0])
    assert first < 10 and h.loc[first, "grad_finite"] and h.loc[first, "loss_finite"]
    assert math.isfinite(h.loc[first, "grad_norm_before_clip"]) and h.loc[first, "grad_norm_before_clip"] < 1e30
    stop = run_kfold(cfg.updated({"training.on_nonfinite": "stop"}), folds=[0], run_dir=tmp_path / "stop",
                     progress=False, max_steps=first + 1)
    assert list(stop.history["action"]) == ["step"] * (first + 1) and stop.nan_folds == []


def test_autopsy_names_a_float32_norm_overflow_as_such():
    # every gradient element finite (1e20), the float32 norm of the 4 of them inf (1e40 > 3.4e38 when
    # squared): phase "grad_norm", the parameter named; float64 gives the true norm, 2e20
    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    snap = capture_step(model, (torch.full((1, 4), 1e20), torch.zeros(1)), loss_fn=_sum_of_predictions,
                        meta={"step": 7, "reasons": ["grad"]})
    rep = autopsy(snap)
    assert (rep.step, rep.phase, rep.module) == (7, "grad_norm", "weight")
    assert rep.grad_norm32 == math.inf and rep.grad_norm64 == pytest.approx(2e20, rel=1e-6)
    assert "every gradient is finite" in rep.verdict()


def _sum_of_predictions(model, batch):
    return model(batch[0]).sum()


def test_rollback_restores_finite_weights_after_a_poisoned_weight(tmp_path):
    cfg = config_from_dict(TINY).updated({"training.on_nonfinite": "rollback"})
    r = run_kfold(cfg, folds=[0], run_dir=tmp_path, progress=False,
                  callbacks=[InjectFault(4, "weight", "model.embedding.weight", float("nan"))])
    h = r.history
    assert list(h["action"]) == ["step"] * 4 + ["rollback"] + ["step"] * (len(h) - 5)
    assert h["params_finite"].all() and r.fold_summary(0)["params_finite_end"] is True
    assert h.loc[5, "lr"] == pytest.approx(0.5 * h.loc[3, "lr"])
    bundle = tmp_path / "fold0" / "nonfinite_step4.pt"
    assert bundle.is_file()
    # the run result says which step was dropped first, why, and where its bundle is
    s = r.fold_summary(0)
    assert (s["n_rollbacks"], s["first_dropped_step"], s["bundle"]) == (1, 4, str(bundle))
    assert s["autopsy_verdict"] == "`embedding`'s own parameters were already non-finite before the step"
    assert s["fate"] == "recovered"


def test_rollback_lr_cut_survives_the_warmup_schedulers(tmp_path):
    # SequentialLR(LinearLR, StepLR): after its milestone StepLR recomputes lr from base_lrs, so a cut of
    # the param groups alone would be undone; the guard scales base_lrs too. 16 steps, milestone at 3.
    cfg = config_from_dict(TINY).updated({"training.max_epochs": 2, "training.warmup": {
        "enabled": True, "total_iters": 3, "step_size": 4, "gamma": 0.5}})
    ref = run_kfold(cfg, folds=[0], run_dir=tmp_path / "ref", progress=False).history
    rb = run_kfold(cfg.updated({"training.on_nonfinite": "rollback"}), folds=[0], run_dir=tmp_path / "rb",
                   progress=False, callbacks=[InjectFault(2, "weight", "model.embedding.weight")]).history
    assert len(rb) == len(ref) == 16 and rb.loc[2, "action"] == "rollback"
    assert (rb["lr"] / ref["lr"]).round(12).tolist() == [1.0, 1.0] + [0.5] * 14
