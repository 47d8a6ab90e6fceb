"""prot_lib.callbacks.DeltaMonitor on a user's LightningModule holding two prot_lib Mamba blocks, under both
Lightning namespaces: the logged delta equals softplus(dt_proj(x) + bias) computed directly from the
block's input, and steps it does not log compute nothing."""
from __future__ import annotations

import copy
import importlib

import lightning.pytorch
import pytest
import pytorch_lightning
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prot_lib.callbacks import DeltaMonitor
from prot_lib.callbacks.delta_monitor import STATS
from prot_lib.models import Mamba

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class _TinyMamba:
    """x: (batch, L=5, F=3) -> embed -> Mamba -> Mamba -> mean over L -> (batch,)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.blocks = nn.ModuleList([Mamba(8, d_state=4, d_conv=2, expand=2, backend="torch") for _ in range(2)])
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean(1)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)  # large: delta must move between logs


class LplTiny(_TinyMamba, lightning.pytorch.LightningModule):
    pass


class PtlTiny(_TinyMamba, pytorch_lightning.LightningModule):
    pass


class Spy(pytorch_lightning.Callback, lightning.pytorch.Callback):
    """At every step start: a copy of the module and the batch, and how many forward hooks x_proj holds
    (listed after the monitor, so its hooks for this step are already registered)."""

    def __init__(self):
        self.modules, self.batches, self.hooks = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.hooks.append([len(b.x_proj._forward_hooks) for b in pl_module.blocks])
        twin = copy.deepcopy(pl_module)
        for b in twin.blocks:  # the copy must not call the monitor's hook when the test re-runs it
            b.x_proj._forward_hooks.clear()
        self.modules.append(twin)
        self.batches.append(batch[0].clone())


def direct_delta(block: Mamba, h: torch.Tensor) -> torch.Tensor:
    """softplus(dt_proj(x) + bias) from the block's input h (batch, L, d_model), along the block's own path:
    in_proj, causal conv, SiLU, x_proj, then dt_proj as an nn.Linear (weight and bias)."""
    x, _ = block.in_proj(h).chunk(2, dim=-1)
    x = F.silu(block.conv1d(x))
    dt = block.x_proj(x)[..., :block.dt_rank]
    return F.softplus(block.dt_proj(dt))


def fit(ns, callbacks, max_steps, seed=0):
    pl = importlib.import_module(ns)
    pl.seed_everything(seed, verbose=False)
    module = {"lightning.pytorch": LplTiny, "pytorch_lightning": PtlTiny}[ns]()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 5, 3, generator=g)
    y = 3 * x[:, :, 0].mean(1) + 1
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=12, shuffle=False))
    return trainer, module


@pytest.mark.parametrize("ns", NAMESPACES)
def test_logged_delta_equals_the_direct_computation(ns):
    monitor, spy = DeltaMonitor(every_n_steps=3, max_samples=5), Spy()
    trainer, module = fit(ns, [monitor, spy], max_steps=7)
    df = monitor.frame()
    assert sorted(df["step"].unique()) == [0, 3, 6]
    assert list(df["block"].unique()) == ["blocks.0", "blocks.1"]
    for step in (0, 3, 6):
        copy_ = spy.modules[step]
        inputs = {}
        handles = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
                   for i, b in enumerate(copy_.blocks)]
        with torch.no_grad():
            copy_(spy.batches[step])
            for i, b in enumerate(copy_.blocks):
                delta = direct_delta(b, inputs[i][:5])           # the monitor's first max_samples rows
                bias = F.softplus(b.dt_proj.bias)
                row = df[(df["step"] == step) & (df["block"] == f"blocks.{i}")].iloc[0]
                a_abs = torch.exp(b.A_log)
                want = {"delta_median": delta.median(), "delta_max": delta.max(),
                        "delta_bias_median": bias.median(), "delta_bias_max": bias.max(),
                        "A_abs_min": a_abs.min(),
                        "decay_exponent_max": (delta[..., :, None] * a_abs).max()}  # over rows, t, channels, states
                for k, v in want.items():
                    assert row[k] == pytest.approx(float(v), rel=1e-5, abs=1e-7), (step, i, k)
        for h in handles:
            h.remove()
    # training moved delta between the logged steps (the test would pass trivially on a frozen model)
    first, last = df[df["step"] == 0], df[df["step"] == 6]
    assert (first["delta_max"].to_numpy() != last["delta_max"].to_numpy()).all()
    # the last logged step's values are what Lightning holds as logged metrics
    for _, r in last.iterrows():
        for stat in STATS:
            assert float(trainer.callback_metrics[f"{stat}/{r['block']}"]) == pytest.approx(r[stat], rel=1e-6)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_nothing_is_computed_on_steps_it_does_not_log(ns):
    monitor, spy = DeltaMonitor(every_n_steps=4, log=False), Spy()
    _, module = fit(ns, [monitor, spy], max_steps=9)
    # steps 0..8: hooks exist (one per block's x_proj) only on steps 0, 4, 8, and fire once per block there
    assert spy.hooks == [[1, 1] if s % 4 == 0 else [0, 0] for s in range(9)]
    assert monitor.n_measured == 3 * 2
    assert sorted(monitor.frame()["step"].unique()) == [0, 4, 8]
    # after fit, no hook is left on the trained module
    assert [len(b.x_proj._forward_hooks) for b in module.blocks] == [0, 0]


def test_bad_arguments_and_a_module_without_mamba():
    with pytest.raises(ValueError, match="every_n_steps"):
        DeltaMonitor(every_n_steps=0)
    with pytest.raises(RuntimeError, match="no prot_lib.models.Mamba block"):
        DeltaMonitor().on_fit_start(None, nn.Linear(2, 2))
