"""The autopsy sees inside the S6 scan (issue 9 sec. 3): the first non-finite quantity, its step t and indices.

Every finding is checked against something computed apart from :func:`scan_autopsy`'s own loop: the
planted index, the block's real scan output (:func:`capture_scan`, the numba kernels or the chunked
scan), or the project's reference loop :func:`selective_scan_reference` run on the captured arguments.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prot_lib.diagnostics import ScanAutopsy, autopsy, capture_scan, capture_step, scan_autopsy
from prot_lib.models import Mamba
from prot_lib.models.mamba import inverse_softplus
from prot_lib.models.selective_scan import selective_scan_reference


def _block(seed: int = 0) -> Mamba:
    torch.manual_seed(seed)
    return Mamba(8, d_state=4, backend="torch")


def _input(seed: int = 1, L: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, L, 8, generator=g)


def _first_bad_t(out: torch.Tensor):
    """First step t (last dim) at which any element of (batch, d_inner, L) ``out`` is non-finite."""
    bad = (~torch.isfinite(out)).any(dim=(0, 1)).nonzero()
    return None if len(bad) == 0 else int(bad[0])


def _reference(block: Mamba, x: torch.Tensor, steps=None, last_state=False):
    """The reference loop on the block's captured scan arguments (delta already after bias and softplus)."""
    cap = capture_scan(block, x)
    sl = slice(None) if steps is None else slice(0, steps)
    args = [cap[k][..., sl] for k in ("u", "delta")] + [cap["A"]] + [cap[k][..., sl] for k in ("B", "C")]
    return cap, selective_scan_reference(*args, D=block.D.detach(), z=cap["z"][..., sl], return_last_state=last_state)


class _Net(nn.Module):
    """embedding -> Mamba -> head on the last token: the smallest model whose block the autopsy must open."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Linear(3, 8)
        self.mamba = Mamba(8, d_state=4, backend="torch")
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.mamba(self.embedding(x))[:, -1]).squeeze(-1)


def _mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def test_a_finite_block_names_nothing():
    r = scan_autopsy(_block(), _input(), "blk")
    assert (r.found, r.quantity, r.kind, r.block_out_finite, r.steps) == (False, None, None, True, 32)
    assert "finite on this input" in r.sentence()


def test_nan_in_dt_proj_bias_is_the_birth_place_not_out_proj():
    net = _Net()
    with torch.no_grad():
        net.mamba.dt_proj.bias[5] = float("nan")
    batch = (torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(2))
    rep = autopsy(capture_step(net, batch, loss_fn=_mse))
    # the hooks still see it first at out_proj (phase/module keep their meaning) ...
    assert (rep.phase, rep.module) == ("forward", "mamba.out_proj")
    # ... the scan autopsy names the parameter and its channel
    s = rep.scan
    assert (s.block, s.quantity, s.kind, s.index, s.block_out_finite) == \
        ("mamba", "dt_proj.bias", "parameter", {"channel": 5}, False)
    assert "dt_proj.bias" in rep.verdict() and "received non-finite inputs" not in rep.verdict()
    assert rep.summary()["scan"]["quantity"] == "dt_proj.bias" and "inside the scan" in str(rep)
    # independent: the block's real scan output is non-finite in channel 5 only, at every step
    x_in = net.embedding(batch[0]).detach()
    out = capture_scan(net.mamba, x_in)["out"]
    assert (~torch.isfinite(out)).any(dim=(0, 2)).nonzero().flatten().tolist() == [5]
    assert bool((~torch.isfinite(out[:, 5])).all())


def test_inf_in_A_log_is_named_with_its_channel_and_state():
    blk = _block()
    with torch.no_grad():
        blk.A_log[3, 2] = float("inf")
    r = scan_autopsy(blk, _input(), "blk")
    assert (r.quantity, r.kind, r.index, r.value) == ("A_log", "parameter", {"channel": 3, "state": 2}, float("inf"))
    # A = -inf makes exp(delta*A) = 0 there: the forward stays finite (the real scan agrees), so only the
    # gradients will show it; the report says so rather than calling the output non-finite
    assert r.block_out_finite and bool(torch.isfinite(capture_scan(blk, _input())["out"]).all())
    assert "still finite" in r.sentence()


def test_autopsy_names_inf_A_log_although_the_forward_is_finite():
    # replayed before this test: "forward and loss are finite; the first non-finite gradient is that of
    # parameter `mamba.dt_proj.bias`", a parameter that is fine
    net = _Net()
    with torch.no_grad():
        net.mamba.A_log[3, 2] = float("inf")
    batch = (torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(2))
    rep = autopsy(capture_step(net, batch, loss_fn=_mse))
    assert rep.phase == "backward" and rep.nonfinite_params == ["mamba.A_log"]
    assert (rep.scan.block, rep.scan.quantity, rep.scan.index) == ("mamba", "A_log", {"channel": 3, "state": 2})
    assert rep.verdict().startswith("born in `mamba`'s parameter A_log")


def test_finite_A_log_whose_exp_overflows_names_A():
    blk = _block()
    with torch.no_grad():
        blk.A_log[6, 1] = 100.0  # exp(100) > float32 max 3.4e38
    r = scan_autopsy(blk, _input(), "blk")
    assert (r.quantity, r.kind, r.index, r.context) == ("A", "parameter", {"channel": 6, "state": 1}, {"A_log there": 100.0})
    assert torch.isinf(-torch.exp(torch.tensor(100.0)))  # independent: float32's exp overflows there


def test_nan_in_D_is_named_and_poisons_exactly_its_channel():
    blk = _block()
    with torch.no_grad():
        blk.D[7] = float("nan")
    r = scan_autopsy(blk, _input(), "blk")
    assert (r.quantity, r.kind, r.index, r.block_out_finite) == ("D", "parameter", {"channel": 7}, False)
    out = capture_scan(blk, _input())["out"]
    assert (~torch.isfinite(out)).any(dim=(0, 2)).nonzero().flatten().tolist() == [7]


def _accumulating_block() -> Mamba:
    """A block whose state can only accumulate: delta = 0.001 everywhere (decay exp(0.001 A) >= 0.984),
    the readout C and the skip D zeroed, so that h_t is the one quantity that can overflow."""
    blk = _block()
    with torch.no_grad():
        blk.dt_proj.weight.zero_()
        blk.dt_proj.bias.fill_(float(inverse_softplus(torch.tensor(1e-3))))
        blk.x_proj.weight[blk.dt_rank + blk.d_state:] = 0.0  # C rows
        blk.D.zero_()
    return blk


def test_state_overflow_is_named_as_h_with_its_step_and_state():
    blk = _accumulating_block()
    x = 1e21 * torch.rand(2, 1, 8, generator=torch.Generator().manual_seed(0)).expand(2, 64, 8).contiguous()
    r = scan_autopsy(blk, x, "blk")
    assert (r.quantity, r.kind) == ("h", "scan")
    t, (b, c, n) = r.t, (r.index["batch"], r.index["channel"], r.index["state"])
    assert t == 34  # measured; checked below against the reference loop
    # independent: the reference loop's last state is finite after t steps and non-finite at (b, c, n) after t+1
    _, (_, h_t_minus_1) = _reference(blk, x, steps=t, last_state=True)
    _, (_, h_t) = _reference(blk, x, steps=t + 1, last_state=True)
    assert bool(torch.isfinite(h_t_minus_1).all()) and not bool(torch.isfinite(h_t[b, c, n]))
    assert (~torch.isfinite(h_t)).nonzero()[0].tolist() == [b, c, n]
    # the state grew by finite kicks: every input of the step was finite
    assert r.context["delta*B*u there"] != 0 and abs(r.context["h_{t-1} there"]) < 3.5e38
    # and the block's real scan output first goes non-finite at that step
    assert _first_bad_t(capture_scan(blk, x)["out"]) == t


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6, 1e9, 1e12, 1e15, 1e18])
def test_recomputation_matches_the_scans_own_nonfinite_pattern(scale):
    blk = _block()
    x = scale * _input()
    r = scan_autopsy(blk, x, "blk")
    cap, ref_out = _reference(blk, x)
    real_out = cap["out"]  # the scan the block really ran (numba kernels or chunked scan)
    assert torch.equal(torch.isfinite(real_out), torch.isfinite(ref_out))
    assert (r.kind == "scan") == (not bool(torch.isfinite(real_out).all())) == (not r.block_out_finite)
    if r.found:
        assert r.t == _first_bad_t(real_out)
        assert not bool(torch.isfinite(real_out[r.index["batch"], r.index["channel"], r.t]))


def test_a_non_finite_input_is_not_blamed_on_the_scan():
    x = _input()
    x[1, 4, 2] = float("nan")
    r = scan_autopsy(_block(), x, "blk")
    assert (r.quantity, r.kind, r.t, r.index) == ("input", "input", 4, {"batch": 1, "feature": 2})
    assert not r.born_inside


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="Mamba"):
        scan_autopsy(nn.Linear(8, 8), _input())
    with pytest.raises(ValueError, match="d_model=8"):
        scan_autopsy(_block(), torch.zeros(2, 5, 3))


def test_finite_step_and_poisoned_out_proj_leave_the_verdict_alone():
    net = _Net()
    batch = (torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(2))
    assert autopsy(capture_step(net, batch, loss_fn=_mse)).scan is None  # nothing non-finite: no scan autopsy
    with torch.no_grad():
        net.mamba.out_proj.weight[0, 0] = float("inf")
    rep = autopsy(capture_step(net, batch, loss_fn=_mse))
    assert rep.module == "mamba.out_proj" and "own parameters" in rep.verdict()
    assert isinstance(rep.scan, ScanAutopsy) and not rep.scan.found  # its scan is finite: said, not blamed
    # the module right after a block: the block it read from is opened too, and found finite
    net = _Net()
    with torch.no_grad():
        net.head.weight[0, 0] = float("inf")
    rep = autopsy(capture_step(net, batch, loss_fn=_mse))
    assert (rep.module, rep.scan.block, rep.scan.found) == ("head", "mamba", False)
    assert "own parameters" in rep.verdict()


def test_writeup_scale_ci_reproduction_names_the_block_and_the_quantity_inside_its_scan():
    from prot_lib.training import fold_start, reproduction_config  # the test may reach up; diagnostics may not

    torch.set_num_threads(1)
    model, x, y = fold_start(reproduction_config("dyconex_long_ci"), 1)
    rep = autopsy(capture_step(model, (x, y), loss_fn=_mse))
    s = rep.scan
    assert (rep.phase, rep.module) == ("forward", "bimamba.forward_layers.3.out_proj")  # what hooks see
    assert (s.block, s.kind) == ("bimamba.forward_layers.3", "scan")  # layer 3 (docs/findings_writeup_model.md)
    # independent: the reference loop on that block's own input and captured arguments
    block = model.bimamba.forward_layers[3]
    seen = []
    handle = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    cap, ref_out = _reference(block, seen[0])
    t, b, c = s.t, s.index["batch"], s.index["channel"]
    assert t == _first_bad_t(ref_out) == _first_bad_t(cap["out"])
    assert not bool(torch.isfinite(ref_out[b, c, t]))
    assert s.quantity == "delta*B*u"  # measured: delta*B overflows to -inf and u is -0 there: inf * 0 = NaN
    n = s.index["state"]
    dB = cap["delta"][b, c, t] * cap["B"][b, n, t]
    assert torch.isinf(dB) and float(cap["u"][b, c, t]) == 0.0 and torch.isnan(dB * cap["u"][b, c, t])
    # nothing earlier in the scan was non-finite: every kick before t is finite
    dBu_before = (cap["delta"][:, :, None, :t] * cap["B"][:, None, :, :t]) * cap["u"][:, :, None, :t]
    assert bool(torch.isfinite(dBu_before).all())
    assert "forward_layers.3" in rep.verdict() and "delta*B*u at t=" in rep.verdict()
