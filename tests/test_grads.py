"""Gradient norms accumulated in float64 (prot_lib.diagnostics.grads): a float32 overflow of the norm is not
a non-finite gradient; inf/NaN elements still are; the per-step cache is shared and dropped."""
import math

import pytest
import torch
from torch import nn

from prot_lib.diagnostics import grads as G


def _params(*values):
    ps = []
    for v in values:
        p = nn.Parameter(torch.zeros_like(v))
        p.grad = v.clone()
        ps.append(p)
    return ps


def test_float32_norm_overflow_is_finite_in_float64():
    ps = _params(torch.full((10,), 1e19), torch.ones(3))
    assert torch.nn.utils.get_total_norm([p.grad for p in ps]) == math.inf  # float32: squares overflow
    total = G.total_grad_norm(ps)
    big = float(torch.tensor(1e19))  # the float32 nearest 1e19
    assert total.dtype == torch.float64 and float(total) == pytest.approx(math.sqrt(10 * big ** 2 + 3), rel=1e-12)


@pytest.mark.parametrize("bad, expected", [(math.inf, math.inf), (-math.inf, math.inf), (math.nan, None)])
def test_a_nonfinite_element_is_still_nonfinite(bad, expected):
    ps = _params(torch.full((10,), 1e19), torch.tensor([1.0, bad]))
    total = float(G.total_grad_norm(ps))
    assert (math.isnan(total) if expected is None else total == expected)


@pytest.mark.parametrize("cat_max, rtol", [(G.CAT_MAX_NUMEL, 1e-6), (0, 1e-12)])
def test_both_reduction_paths_agree_with_float64_by_hand(monkeypatch, cat_max, rtol):
    # the concatenated CPU path reduces a finite norm in float32 (relative error ~1e-7); _foreach_norm in float64
    monkeypatch.setattr(G, "CAT_MAX_NUMEL", cat_max)
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(5, 7, generator=g) * 1e18, torch.randn(11, generator=g), torch.randn(2, 3, 4, generator=g)]
    ps = _params(*values)
    expected = math.sqrt(sum(float((v.double() ** 2).sum()) for v in values))
    assert float(G.total_grad_norm(ps)) == pytest.approx(expected, rel=rtol)
    norms = G.grad_norms((f"p{i}", p) for i, p in enumerate(ps))
    assert norms.as_dict() == pytest.approx({f"p{i}": float(v.double().norm()) for i, v in enumerate(values)}, rel=1e-12)
    assert norms.largest()[0] == "p0"


def test_pre_clip_norms_are_measured_once_per_step_and_forgotten():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[1].bias.grad = None  # a parameter without gradient is left out
    G.track(model, per_tensor=True)
    first = G.pre_clip_grad_norms(model)
    assert first.names == ["0.weight", "0.bias", "1.weight"]
    for p in model.parameters():  # a callback clips in place...
        if p.grad is not None:
            p.grad.mul_(0.5)
    again = G.pre_clip_grad_norms(model)  # ...later readers in the same step still see the pre-clip numbers
    assert again is first and first.total_value() == pytest.approx(math.sqrt(10))  # 6 + 2 + 2 ones
    assert first.as_dict()["0.weight"] == pytest.approx(math.sqrt(6))  # taken before the clip (per_tensor=True)
    G.forget(model)  # a new backward ran
    assert G.pre_clip_grad_norms(model).total_value() == pytest.approx(0.5 * math.sqrt(10))
