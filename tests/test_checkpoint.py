"""FiniteCheckpoint (training.checkpoint): never a non-finite checkpoint on disk, never a good one replaced by a
bad one, atomic writes.

The main test is fault injection: 60 short runs, each with one inf/NaN planted in a weight, a gradient
or Adam's state at a random step, under the worst policy for it (``continue``: the run goes on with a
NaN model and the checkpoint callback is asked to save it at every step).
"""
import math
import os
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning.pytorch.plugins.io import TorchCheckpointIO

from prot_lib.utils.io import atomic_torch_save
from prot_lib.callbacks import FiniteCheckpoint, NonFiniteGuard, first_nonfinite
from prot_lib.diagnostics.faults import TARGETS, InjectFault
from prot_lib.training import config_from_dict, load_checkpoint, run_kfold
from prot_lib.training.module import NaNStudyModule

N_TRIALS = 60
MAX_STEPS = 8
CFG = config_from_dict({"model": {"d_model": 4, "n_layers": 1, "d_state": 4, "expand": 1},
                        "training": {"lr": 1e-2, "batch_size": 8, "gradient_clip_val": None}})
_g = torch.Generator().manual_seed(0)
X, Y = torch.randn(64, 3, 4, generator=_g), torch.randn(64, generator=_g)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.delenv("PROT_LIB_CACHE", raising=False)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def fit(module, dirpath: Path, callbacks=(), x=X, y=Y, seed=0, plugins=None, **ckpt_kw):
    kw = dict(monitor="train_loss", save_top_k=2, save_last=True, every_n_train_steps=1)
    kw.update(ckpt_kw)
    ck = FiniteCheckpoint(dirpath=dirpath, filename="{step}", enable_version_counter=False, **kw)
    dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[*callbacks, ck], plugins=plugins,
                         limit_val_batches=0, num_sanity_val_steps=0, deterministic=True)
    trainer.fit(module, dl)
    return ck


def on_disk(dirpath: Path):
    """Every checkpoint file: (name, global_step, non-finite tensor path or None, monitored score)."""
    out = []
    for f in sorted(dirpath.glob("*.ckpt")):
        c = torch.load(f, map_location="cpu", weights_only=False)
        bad = first_nonfinite({"state_dict": c["state_dict"], "optimizer_states": c["optimizer_states"]})
        score = next(v["current_score"] for k, v in c["callbacks"].items() if k.startswith("FiniteCheckpoint"))
        out.append((f.name, c["global_step"], bad, None if score is None else float(score)))
    return out


def test_fault_injection_never_leaves_a_nonfinite_checkpoint(tmp_path):
    counts = {"trials": 0, "files": 0, "nonfinite_files": 0, "refused": 0}
    for i in range(N_TRIALS):
        rng = random.Random(i)
        step = rng.randrange(0, MAX_STEPS - 1)
        target = TARGETS[i % len(TARGETS)]
        value = rng.choice([math.nan, math.inf, -math.inf])
        pl.seed_everything(i, verbose=False)
        module = NaNStudyModule(CFG, n_features=4)
        param = rng.choice([n for n, _ in module.named_parameters()])
        fault = InjectFault(step, target, param, value, index=rng.randrange(1000))
        d = tmp_path / f"trial{i}"
        ck = fit(module, d, [fault], seed=i)
        assert fault.fired, (i, step, target)
        files = on_disk(d)
        counts["trials"] += 1
        counts["files"] += len(files)
        counts["refused"] += len(ck.refused)
        counts["nonfinite_files"] += sum(bad is not None or (s is not None and not math.isfinite(s))
                                         for _, _, bad, s in files)
        assert not list(d.glob("*.tmp")) and not list(d.glob(".*.tmp")), "temp files left behind"
        # The state after `step` optimizer steps is the last finite one: the fault lands in step
        # `step` (weight, grad) or right after its update (weight_after, optimizer_state).
        assert ck.refused and ck.refused[0][0] == step + 1, (i, target, step, ck.refused[:2])
        names = {name: gs for name, gs, _, _ in files}
        if step == 0:
            assert names == {}, (i, names)
            continue
        assert names["last.ckpt"] == step, (i, target, step, names)
        assert max(names.values()) == step
        m = load_checkpoint(d / "last.ckpt")
        with torch.no_grad():
            assert torch.isfinite(m(X)).all()
    print(f"\nfault injection: {counts}")
    assert counts["trials"] >= 50 and counts["nonfinite_files"] == 0 and counts["files"] > counts["trials"]


def test_nonfinite_monitored_metric_is_refused_with_finite_weights(tmp_path):
    # One NaN input row: under the guard's "skip" the weights stay finite, but the logged train_loss of
    # that batch is NaN, so nothing may be saved at that step; the run goes on and saves again after.
    x = X.clone()
    x[5, 1, 2] = math.nan
    module = NaNStudyModule(CFG, n_features=4)
    ck = fit(module, tmp_path, [NonFiniteGuard("skip", bundle_dir=tmp_path / "bundles")], x=x, save_top_k=-1)
    assert len(ck.refused) == 1 and ck.refused[0][1] == "monitored train_loss = nan"
    steps = sorted(gs for _, gs, bad, s in on_disk(tmp_path) if _ != "last.ckpt")
    assert all(bad is None and math.isfinite(s) for _, _, bad, s in on_disk(tmp_path))
    assert ck.refused[0][0] not in steps and len(steps) == MAX_STEPS - 1
    assert [p.name for p in (tmp_path / "bundles").iterdir()] == [f"nonfinite_step{ck.refused[0][0] - 1}.pt"]


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):  # f: the open temporary file atomic_torch_save hands to torch.save
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]


class _DiskFullAfter(TorchCheckpointIO):
    """Lightning's own writer, which writes the target in place: the n-th save writes half a file and fails."""

    def __init__(self, n_ok: int):
        self.n_ok, self.calls = n_ok, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.calls += 1
        if self.calls > self.n_ok:
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError("disk full")
        super().save_checkpoint(checkpoint, path, storage_options)


def test_finite_checkpoint_write_is_atomic_whatever_the_checkpoint_io(tmp_path):
    # save_top_k=1 + save_last: step 1 writes "step=1.ckpt" and "last.ckpt" (2 saves); step 2's first
    # save fails half-way: every file on disk is still the complete step-1 checkpoint
    with pytest.raises(OSError, match="disk full"):
        fit(NaNStudyModule(CFG, n_features=4), tmp_path, plugins=[_DiskFullAfter(2)], save_top_k=1,
            monitor=None)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["last.ckpt", "step=1.ckpt"], files  # no temporary file left, no half file
    for name in files:
        assert torch.load(tmp_path / name, weights_only=False)["global_step"] == 1


def test_first_nonfinite_names_the_tensor():
    bad = {"state_dict": {"w": torch.ones(2)}, "optimizer_states": [{"state": {0: {"exp_avg_sq": torch.tensor([1.0, math.inf])}}}]}
    assert first_nonfinite(bad) == "optimizer_states.0.state.0.exp_avg_sq"
    assert first_nonfinite({"w": torch.ones(2), "step": torch.tensor(3)}) is None


def test_run_kfold_checkpoint_config_writes_loadable_checkpoints(tmp_path):
    cfg = config_from_dict({"name": "ck", "model": {"d_model": 4, "n_layers": 1, "d_state": 4, "expand": 1},
                            "training": {"max_epochs": 2, "batch_size": 200, "k_fold": 5,
                                         "checkpoint": {"enabled": True, "monitor": "val_loss"}}})
    r = run_kfold(cfg, folds=[0], run_dir=tmp_path, progress=False)
    d = tmp_path / "fold0" / "checkpoints"
    files = on_disk(d)
    assert len(files) == 2 and dict((f, gs) for f, gs, *_ in files)["last.ckpt"] == 8
    assert all(bad is None and math.isfinite(score) for _, _, bad, score in files)
    m = load_checkpoint(d / "last.ckpt")
    assert m.config == cfg
    x = torch.randn(8, 3, 4)
    with torch.no_grad():
        assert torch.equal(m(x), r.models[0].eval()(x))
    # off by default: no checkpoint folder at all
    run_kfold(cfg.updated({"training.checkpoint.enabled": False}), folds=[0], run_dir=tmp_path / "off",
              progress=False, max_steps=2)
    assert not (tmp_path / "off" / "fold0" / "checkpoints").exists()
