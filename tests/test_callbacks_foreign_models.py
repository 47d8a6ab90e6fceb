"""prot_lib.callbacks on models no one here wrote (issue 9, section 2): mambapy's ``Mamba`` (PyPI
``mambapy``) and a ``torch.nn.TransformerEncoder`` regressor, each in a user's LightningModule that knows
nothing of prot_lib, under both Lightning namespaces.

Each model meets a natural failure (a NaN in one input row; divergence at a huge SGD learning rate) and
an injected fault (a NaN planted in a weight). The tests assert what each policy of
:class:`~prot_lib.callbacks.NonFiniteGuard` does, that the autopsy names the phase and a module *of that
model*, and that rollback ends with finite weights.
"""
from __future__ import annotations

import importlib

import lightning.pytorch
import pytest
import pytorch_lightning
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prot_lib.callbacks import NonFiniteGuard, NonFiniteTrainingError
from prot_lib.diagnostics import InjectFault

import mambapy.mamba as mambapy_mamba  # noqa: E402  (in the test extras: a missing package fails, not skips)

L, F_IN, D = 10, 3, 16
NAN_ROW = 19  # in the third batch of 8 (step 2)


class _UserRegressor:
    """(batch, L, 3) -> (batch,): Linear embedding, a sequence model, mean over L, Linear head."""

    def __init__(self, kind: str = "mamba", lr: float = 1e-3, opt: str = "adam"):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(F_IN, D)
        if kind == "mamba":  # mambapy's pure-PyTorch Mamba (its own pscan), 2 residual blocks
            self.body = mambapy_mamba.Mamba(mambapy_mamba.MambaConfig(d_model=D, n_layers=2, d_state=8))
        else:
            layer = nn.TransformerEncoderLayer(D, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
            self.body = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        return self.head(self.body(self.embed(x)).mean(1)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        cls = torch.optim.SGD if self.hparams.opt == "sgd" else torch.optim.Adam
        return cls(self.parameters(), lr=self.hparams.lr)


class LplUser(_UserRegressor, lightning.pytorch.LightningModule):
    pass


class PtlUser(_UserRegressor, pytorch_lightning.LightningModule):
    pass


MODULES = {"lightning.pytorch": LplUser, "pytorch_lightning": PtlUser}
CASES = [(kind, ns) for kind in ("mamba", "transformer") for ns in MODULES]
IDS = [f"{kind}-{ns.split('.')[0]}" for kind, ns in CASES]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # a guard without bundle_dir under a Trainer without a logger writes its bundles to the working directory
    monkeypatch.chdir(tmp_path)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def loader(nan_row=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, L, F_IN, generator=g)
    y = 3 * x[:, :, 0].mean(1)
    if nan_row is not None:
        x[nan_row, 4, 1] = float("nan")  # one missing value in one row
    return DataLoader(TensorDataset(x, y), batch_size=8)


def fit(ns, kind, callbacks, max_steps=8, data=None, **hparams):
    pl = importlib.import_module(ns)
    pl.seed_everything(0, verbose=False)
    module = MODULES[ns](kind=kind, **hparams)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(module, data if data is not None else loader())
    return trainer, module


def finite(module):
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


@pytest.mark.parametrize("kind,ns", CASES, ids=IDS)
def test_a_nan_row_stops_with_the_embedding_named_and_skip_drops_exactly_that_step(kind, ns, tmp_path):
    with pytest.raises(NonFiniteTrainingError) as e:
        fit(ns, kind, [NonFiniteGuard("stop", bundle_dir=tmp_path)], data=loader(NAN_ROW))
    rep = e.value.report
    assert e.value.step == NAN_ROW // 8 and rep.phase == "forward" and rep.module == "embed"
    assert "loss" in rep.reasons and e.value.bundle_path.is_file()

    guard = NonFiniteGuard("skip")
    trainer, module = fit(ns, kind, [guard], data=loader(NAN_ROW))
    assert (guard.n_skipped, guard.first_step, trainer.global_step) == (1, NAN_ROW // 8, 8)
    assert finite(module) and guard.first_report.module == "embed"


@pytest.mark.parametrize("kind,ns", CASES[::2] + CASES[3:4], ids=IDS[::2] + IDS[3:4])
def test_divergence_at_a_huge_lr_is_rolled_back_to_finite_weights_and_a_smaller_lr(kind, ns):
    guard = NonFiniteGuard("rollback", max_consecutive=20, lr_factor=0.5)
    trainer, module = fit(ns, kind, [guard], max_steps=16, lr=100.0, opt="sgd")
    names = dict(module.named_modules())
    assert guard.n_rollbacks >= 3 and finite(module)  # ends with finite weights
    lr_end = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr_end == pytest.approx(100.0 * 0.5 ** guard.n_rollbacks)  # halved once per rollback
    rep = guard.first_report
    assert rep.phase in ("forward", "backward", "loss") and (rep.module in names or rep.module == "loss")


@pytest.mark.parametrize("kind,ns", CASES, ids=IDS)
def test_a_weight_poisoned_mid_run_is_named_and_rolled_back(kind, ns):
    param = "head.weight"
    guard = NonFiniteGuard("rollback")
    trainer, module = fit(ns, kind, [InjectFault(3, "weight", param, float("nan")), guard])
    assert (guard.n_rollbacks, guard.first_step) == (1, 3) and finite(module) and trainer.global_step == 8
    rep = guard.first_report
    assert rep.nonfinite_params == [param] and rep.module in ("head", param)
