"""prot_lib.diagnostics: the tracer names where a non-finite value was born; the snapshot keeps the
state before the first bad step of a real run."""
from __future__ import annotations

import math
from collections import OrderedDict

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn

from prot_lib.diagnostics import NonfiniteSnapshot, ScaleRecorder, TraceRecorder, capture_scan, trace_nonfinite, trace_step
from prot_lib.models import Mamba
from prot_lib.training import NaNStudyModule, reproduction_config, run_kfold, snapshot_module, trace_snapshot


def _linear(w: float, n_in: int = 1, n_out: int = 1) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.fill_(w)
    return lin


def _overflowing_linear_model() -> nn.Module:
    # "big" multiplies by 1e30: finite for |x| = 1, inf for |x| >= ~1e9 (float32 max 3.4e38).
    return nn.Sequential(OrderedDict(pre=_linear(1.0, 2, 2), big=_linear(1e30, 2, 2), act=nn.Tanh(),
                                     head=_linear(1.0, 2, 1)))


# ------------------------------------------------------------------------------------ trace_nonfinite

def test_trace_names_the_layer_that_overflows():
    model = _overflowing_linear_model()
    x = torch.full((4, 2), 1e10)
    report = trace_nonfinite(model, x, torch.zeros(4, 1), nn.functional.mse_loss)
    assert report.first_forward == "big"
    assert report.born_forward == "big"  # its input (1e10, from "pre") was finite
    t = report.table[report.table["phase"] == "forward"].set_index("name")
    assert t.loc["pre", "nonfinite_out"] == 0 and t.loc["pre", "max_abs_out"] == pytest.approx(2e10, rel=1e-6)
    assert t.loc["big", "nonfinite_out"] == 8  # all 4 x 2 outputs are +inf
    assert "`big`" in str(report)


def test_trace_is_silent_on_a_finite_step_and_leaves_the_model_alone():
    model = _overflowing_linear_model()
    report = trace_nonfinite(model, torch.ones(4, 2), torch.zeros(4, 1), nn.functional.mse_loss)
    assert report.first_forward is None and report.born_forward is None and report.first_backward is None
    assert math.isfinite(report.loss)
    # no .grad written, no hook left behind
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    # forward rows come in execution order: data, then children before the root
    fwd = report.table[report.table["phase"] == "forward"]["name"].tolist()
    assert fwd == ["input", "target", "pre", "big", "act", "head", "<model>", "loss"]


def test_trace_forward_only_without_target():
    report = trace_nonfinite(_overflowing_linear_model(), torch.full((1, 2), 1e10))
    assert report.loss is None and not report.backward_ran
    assert report.first_forward == "big" and report.first_backward is None


def test_trace_finite_forward_but_mse_overflows_then_a_weight_gradient():
    # h = 1e19, pred = 10 h = 1e20 (finite), loss = pred^2 = 1e40 -> inf in float32.
    # Backward: dL/dpred = 2e20 (finite), dL/dh = 2e21 (finite), dL/d(second.weight) = 2e20 * 1e19 -> inf.
    model = nn.Sequential(OrderedDict(first=_linear(1e19), second=_linear(10.0)))
    report = trace_nonfinite(model, torch.ones(1, 1), torch.zeros(1, 1), nn.functional.mse_loss)
    assert report.loss == math.inf
    assert report.first_forward == "loss" and report.born_forward == "loss"
    assert report.prediction_max_abs == pytest.approx(1e20, rel=1e-6)
    assert report.first_backward == "second.weight"
    bwd = report.table[report.table["phase"] == "backward"].set_index("name")
    assert bwd.loc["<model>", "nonfinite_out"] == 0  # the gradient at the prediction is finite
    assert bwd.loc["first.weight", "nonfinite_out"] == 0
    assert "born in the loss" in str(report)


def test_trace_nan_in_the_data_is_not_born_in_the_model():
    model = _overflowing_linear_model()
    x = torch.ones(3, 2)
    x[1, 0] = math.nan
    report = trace_nonfinite(model, x)
    assert report.nonfinite_data == {"input": 1}
    assert report.first_forward == "pre" and report.born_forward is None
    assert "came in with the data" in str(report)


def test_trace_loss_fn_must_return_a_scalar():
    with pytest.raises(ValueError, match="scalar"):
        trace_nonfinite(_linear(1.0), torch.ones(2, 1), torch.ones(2, 1), lambda p, t: (p - t) ** 2)


class _Functional(nn.Module):
    """A parameter used functionally (as mamba's dt_proj.bias is): no module hook sees where it enters."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(2, 2)
        self.shift = nn.Parameter(torch.zeros(2))
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.inner(x) + self.shift)


def test_trace_step_probe_names_a_quantity_inside_a_module():
    # The hook point for quantities no module hook sees (issue 9 sec. 3): a probe records `inner+shift`
    # at the moment it is computed. Without the probe the first non-finite value is `head`'s output and
    # no module "gave birth" to it; with the probe the internal row comes first and says its parameter
    # was non-finite.
    model = _Functional()
    with torch.no_grad():
        model.shift[1] = float("inf")

    def probe(m, rec: TraceRecorder):
        def hook(module, args, output):
            rec.record_internal("<model>:inner+shift", "add", [output + m.shift], inputs=[output],
                                params_finite=bool(torch.isfinite(m.shift).all()))
        return _Removing(m.inner.register_forward_hook(hook))

    def loss(m, batch):
        return nn.functional.mse_loss(m(batch[0]).squeeze(-1), batch[1])

    batch = (torch.ones(3, 2), torch.zeros(3))
    plain = trace_step(model, loss, batch)
    assert plain.first_forward == "head" and plain.born_forward is None
    probed = trace_step(model, loss, batch, probes=[probe])
    row = probed.first_row("forward")
    assert (row["name"], row["kind"], row["nonfinite_out"], row["params_finite"], row["born"]) == \
        ("<model>:inner+shift", "internal", 3, False, False)
    assert "head" in probed.table["name"].tolist()  # the module rows are all still there, after it


class _Removing:
    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_capture_scan_sees_delta_and_a_decay_at_most_one():
    torch.manual_seed(0)
    block = Mamba(d_model=8, d_state=4, backend="torch")
    h = torch.randn(2, 5, 8)
    seen = capture_scan(block, h)
    assert seen["u"].shape == (2, 16, 5) and seen["deltaA"].shape == (2, 16, 5, 4)
    assert (seen["delta"] > 0).all()  # softplus
    assert seen["deltaA"].max() <= 1.0  # exp(delta * A) with A < 0
    with torch.no_grad():
        torch.testing.assert_close(seen["block_out"], block(h))
    assert "_scan" not in vars(block)  # the wrapper is gone


# ------------------------------------------------------------------------------------ the snapshot

@pytest.fixture(scope="module")
def dyconex_snapshot_run(tmp_path_factory):
    cfg = reproduction_config("dyconex")
    snap, scales = NonfiniteSnapshot(), ScaleRecorder(["model", "model.embedding"])
    res = run_kfold(cfg, folds=[0], max_steps=2, callbacks=[snap, scales], progress=False,
                    run_dir=tmp_path_factory.mktemp("runs"))
    return cfg, snap, scales, res


def test_snapshot_catches_step_zero_of_dyconex_with_the_state_before_it(dyconex_snapshot_run):
    cfg, snap, _, res = dyconex_snapshot_run
    s = snap.snapshot
    assert s is not None
    assert (s["fold"], s["step"], s["epoch"]) == (0, 0, 0)
    assert s["reasons"] == ["loss", "grad", "params"]
    # The state before step 0 is the freshly initialised model of fold 0 (run_kfold seeds seed + fold).
    pl.seed_everything(cfg.training.seed + 0, verbose=False)
    fresh = NaNStudyModule(cfg, n_features=s["batch"][0].shape[-1]).state_dict()
    assert s["state_dict"].keys() == fresh.keys()
    assert all(torch.equal(s["state_dict"][k], fresh[k]) for k in fresh)
    assert all(torch.isfinite(v).all() for v in s["state_dict"].values())
    assert not res.summary.loc[0, "params_finite_end"]  # the step itself ruined the weights
    x, y = s["batch"]
    assert x.shape == (cfg.training.batch_size, 18, 11) and y.shape == (cfg.training.batch_size,)


def test_trace_of_the_dyconex_snapshot(dyconex_snapshot_run):
    cfg, snap, _, _ = dyconex_snapshot_run
    report = trace_snapshot(snap.snapshot, cfg)
    assert report.nonfinite_data["input"] > 0  # missing measurements are NaN in the raw batch
    assert report.first_forward == "embedding" and report.born_forward is None
    assert not math.isfinite(report.loss)
    assert report.first_backward is not None
    module = snapshot_module(snap.snapshot, cfg)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_scale_recorder_one_row_per_training_step(dyconex_snapshot_run):
    _, _, scales, _ = dyconex_snapshot_run
    t = scales.table
    assert set(t["module"]) == {"model", "model.embedding"}
    assert t[t["module"] == "model"]["step"].tolist() == [0, 1]
    emb0 = t[(t["module"] == "model.embedding") & (t["step"] == 0)].iloc[0]
    assert emb0["nonfinite"] > 0 and emb0["max_abs"] > 1e6  # raw timestamps ~1.7e9 s through a Linear


def test_no_snapshot_while_training_stays_finite(tmp_path):
    snap = NonfiniteSnapshot()
    res = run_kfold(reproduction_config("ishigami"), folds=[0], max_steps=3, callbacks=[snap],
                    progress=False, run_dir=tmp_path)
    assert res.history["loss_finite"].all()
    assert snap.snapshot is None
    with pytest.raises(ValueError, match="no snapshot"):
        snapshot_module(snap.snapshot, reproduction_config("ishigami"))


def test_params_all_finite_checks_every_parameter_of_every_dtype():
    from prot_lib.diagnostics import params_all_finite

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).double())
    assert params_all_finite(m) is True
    assert params_all_finite(torch.nn.ReLU()) is True  # no parameters
    with torch.no_grad():
        m[1].bias[1] = float("inf")  # the float64 group, its last tensor
    assert params_all_finite(m) is False
    with torch.no_grad():
        m[1].bias[1] = 0.0
        m[0].weight[2, 0] = float("nan")  # the float32 group
    assert params_all_finite(m) is False
