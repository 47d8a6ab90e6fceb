"""The Mamba block's time-major causal depthwise convolution (prot_lib.models.mamba.CausalConv1d,
causal_depthwise_conv1d, the compiled kernels of prot_lib.models.numba_conv) and the low-rank
delta projection (_LowRankLinearFn), against torch's nn.Conv1d / F.linear, which the block used
before (mamba-ssm's non-fused path)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prot_lib.models import numba_conv, numba_scan
from prot_lib.models.mamba import (CausalConv1d, Mamba, _CausalConvFn, _LowRankLinearFn,
                                   causal_depthwise_conv1d)
from prot_lib.models.selective_scan import selective_scan

INF, NAN = float("inf"), float("nan")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def reference_conv(x, weight, bias):
    """nn.Conv1d(C, C, K, groups=C, padding=K-1) on (batch, C, L), cut back to L, time-major again:
    the block's conv1d before the time-major one (and mamba-ssm's)."""
    L, K = x.shape[1], weight.shape[-1]
    return F.conv1d(x.transpose(1, 2), weight, bias, padding=K - 1, groups=weight.shape[0])[..., :L].transpose(1, 2)


def torch_path(x, weight, bias):
    return _CausalConvFn.apply(x, weight, bias)


def numba_path(x, weight, bias):
    return numba_conv.numba_causal_conv1d(x, weight, bias)


PATHS = {"torch": torch_path, "numba": numba_path}


def _inputs(batch, L, C, K, bias, seed=0, dtype=torch.float32, in_proj_half=False):
    g = torch.Generator().manual_seed(seed)
    if in_proj_half:  # x as Mamba reads it: the first half of in_proj's (batch, L, 2C) output
        x = torch.randn(batch, L, 2 * C, generator=g, dtype=dtype)[..., :C]
    else:
        x = torch.randn(batch, L, C, generator=g, dtype=dtype)
    w = torch.randn(C, 1, K, generator=g, dtype=dtype)
    b = torch.randn(C, generator=g, dtype=dtype) if bias else None
    return x, w, b


def _grads(fn, x, w, b, g_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    out = fn(*leaves)
    out.backward(g_out)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


SHAPES = [(3, 37, 24, 4, True), (2, 1, 16, 4, True), (2, 3, 10, 4, False), (1, 50, 200, 4, True),
          (4, 33, 7, 1, True), (2, 29, 12, 3, False)]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("in_proj_half", [False, True], ids=["contiguous", "in_proj-half"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-L{}-C{}-K{}-{}".format(*s[:4], "bias" if s[4] else "nobias"))
def test_forward_and_backward_match_nn_conv1d(path, in_proj_half, shape):
    """Output and every gradient within float32 round-off of nn.Conv1d's (L = 1 and L < K
    included; x strided as a half of in_proj's output)."""
    batch, L, C, K, bias = shape
    x, w, b = _inputs(batch, L, C, K, bias, in_proj_half=in_proj_half)
    g_out = torch.randn(batch, L, C, generator=torch.Generator().manual_seed(1))
    out, grads = _grads(PATHS[path], x, w, b, g_out)
    ref_out, ref_grads = _grads(reference_conv, x, w, b, g_out)
    assert out.shape == (batch, L, C) and out.is_contiguous()
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
        if want is None:
            assert got is None
            continue
        # dl/dweight sums batch * L products: float32 round-off grows with that count
        atol = 1e-6 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("L", [1, 2, 9])
def test_torch_path_gradcheck_float64(bias, L):
    """The hand-written backward against finite differences (float64, torch path: the numba
    kernels are float32 only and causal_depthwise_conv1d sends float64 to the torch ops)."""
    x, w, b = _inputs(2, L, 5, 4, bias, seed=3, dtype=torch.float64, in_proj_half=True)
    leaves = [t.requires_grad_(True) for t in (x, w, b) if t is not None]
    fn = (lambda x, w, b: causal_depthwise_conv1d(x, w, b)) if bias else (lambda x, w: causal_depthwise_conv1d(x, w))
    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-8, rtol=1e-6)
    # and the float64 result is nn.Conv1d's to float64 round-off
    torch.testing.assert_close(causal_depthwise_conv1d(x, w, b), reference_conv(x, w, b), rtol=1e-12, atol=1e-12)


def test_numba_path_equals_torch_path():
    """Same sums in the same order: output and dl/dx bit-identical; dl/dweight and dl/dbias are
    reduced over (batch, L) in another order, so equal to float32 round-off."""
    x, w, b = _inputs(5, 131, 200, 4, True, seed=7, in_proj_half=True)
    g_out = torch.randn(5, 131, 200, generator=torch.Generator().manual_seed(8))
    out_n, (gx_n, gw_n, gb_n) = _grads(numba_path, x, w, b, g_out)
    out_t, (gx_t, gw_t, gb_t) = _grads(torch_path, x, w, b, g_out)
    assert torch.equal(out_n, out_t)
    assert torch.equal(gx_n, gx_t)
    torch.testing.assert_close(gw_n, gw_t, rtol=1e-5, atol=1e-5 * gw_t.abs().max().item())
    torch.testing.assert_close(gb_n, gb_t, rtol=1e-5, atol=1e-5 * gb_t.abs().max().item())


def test_dispatch_follows_scan_backend(monkeypatch):
    """causal_depthwise_conv1d runs the compiled kernels where the scan would (float32 CPU, numba
    importable, PROT_LIB_SCAN not "torch"), else the torch ops; both give nn.Conv1d's output."""
    assert numba_scan.AVAILABLE, numba_scan.UNAVAILABLE_REASON  # a dependency: absent is a failure
    x, w, b = _inputs(2, 11, 8, 4, True)
    w.requires_grad_(True)
    monkeypatch.setenv("PROT_LIB_SCAN", "auto")
    assert type(causal_depthwise_conv1d(x, w, b).grad_fn).__name__ == "_NumbaConvFnBackward"
    monkeypatch.setenv("PROT_LIB_SCAN", "torch")
    out = causal_depthwise_conv1d(x, w, b)
    assert type(out.grad_fn).__name__ == "_CausalConvFnBackward"
    torch.testing.assert_close(out, reference_conv(x, w, b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", list(PATHS))
def test_nonfinite_weights_and_gradients_as_nn_conv1d(path):
    """An inf or NaN weight, and an inf incoming gradient, give inf/NaN exactly where torch's
    float32 nn.Conv1d gives them: the forward leaves out the taps that read the padding (the first
    K - 1 outputs stay finite through them), the backward multiplies the zeros (dl/dx NaN at the
    last K - 1 steps for an inf weight; dl/dweight NaN for an inf dl/dout at t < K - 1)."""
    batch, L, C, K = 2, 12, 6, 4
    x, w, b = _inputs(batch, L, C, K, True, seed=5)
    w[1, 0, 0] = INF  # oldest tap: reads the padding at t < 3
    w[2, 0, 2] = NAN  # reads the padding at t = 0 only
    w[3, 0, 3] = -INF  # the newest tap: never reads the padding
    g_out = torch.randn(batch, L, C, generator=torch.Generator().manual_seed(6))
    g_out[0, 1, 4] = INF
    out, grads = _grads(PATHS[path], x, w, b, g_out)
    ref_out, ref_grads = _grads(reference_conv, x, w, b, g_out)
    # the pattern this test is about, as nn.Conv1d (float32, torch 2.13 CPU) computes it
    assert torch.isfinite(ref_out[:, :K - 1, 1]).all() and torch.isnan(ref_out[:, K - 1:, 1]).sum() == 0
    assert torch.isinf(ref_out[:, K - 1:, 1]).all()
    assert torch.isfinite(ref_out[:, 0, 2]).all() and torch.isnan(ref_out[:, 1:, 2]).all()
    assert torch.isnan(ref_grads[0][:, L - (K - 1):, 1]).all()  # cut-off outputs: inf * 0
    assert torch.isnan(ref_grads[1][4, 0, :2]).all() and torch.isinf(ref_grads[1][4, 0, 2:]).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6, equal_nan=True)
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"NaN pattern of grad {name}"
        assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"+inf pattern of grad {name}"
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"-inf pattern of grad {name}"
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5 * want[fin].abs().max().item())


def test_causal_conv1d_is_mamba_ssms_conv1d():
    """Same parameters, initialisation (same seed, same draws) and state_dict as the
    nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1) of mamba-ssm; loads
    its state_dict strictly; computes its output, time-major."""
    torch.manual_seed(11)
    conv = CausalConv1d(24, 4)
    torch.manual_seed(11)
    ref = nn.Conv1d(24, 24, kernel_size=4, groups=24, padding=3)
    assert isinstance(conv, nn.Conv1d)
    assert conv.weight.shape == (24, 1, 4) and conv.bias.shape == (24,)
    sd, ref_sd = conv.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd) == ["weight", "bias"]
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    CausalConv1d(24, 4).load_state_dict(ref_sd, strict=True)
    x = torch.randn(3, 17, 24)
    torch.testing.assert_close(conv(x), ref(x.transpose(1, 2))[..., :17].transpose(1, 2), rtol=1e-6, atol=1e-6)
    assert CausalConv1d(8, 3, bias=False).bias is None


def test_bad_shapes_raise_value_errors():
    w = torch.randn(8, 1, 4)
    with pytest.raises(ValueError, match=r"x \(batch, L, C\) and weight \(C, 1, K\).*x \(2, 5, 7\)"):
        causal_depthwise_conv1d(torch.randn(2, 5, 7), w)
    with pytest.raises(ValueError, match=r"x \(2, 8\)"):
        causal_depthwise_conv1d(torch.randn(2, 8), w)
    with pytest.raises(ValueError, match=r"bias must be \(C=8,\), got \(7,\)"):
        causal_depthwise_conv1d(torch.randn(2, 5, 8), w, torch.randn(7))


def test_mamba_block_equals_its_nn_conv1d_form():
    """The whole block (time-major conv, _LowRankLinearFn, the scan on transposed views) against
    the same parameters run as before: nn.Conv1d on (batch, d_inner, L), F.linear for delta, the
    scan on contiguous (batch, channels, L) tensors; output and every parameter's gradient."""
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, backend="torch")
    x = torch.randn(3, 29, 16)

    def before(h):
        L = h.shape[1]
        xz = m.in_proj(h).transpose(1, 2)
        u, z = xz.chunk(2, dim=1)
        u = F.silu(nn.Conv1d.forward(m.conv1d, u)[..., :L])
        x_dbl = m.x_proj(u.transpose(1, 2))
        delta, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
        delta = F.linear(delta, m.dt_proj.weight).transpose(1, 2)
        y = selective_scan(u, delta, -torch.exp(m.A_log.float()), B.transpose(1, 2).contiguous(),
                           C.transpose(1, 2).contiguous(), m.D.float(), z=z,
                           delta_bias=m.dt_proj.bias.float(), delta_softplus=True)
        return m.out_proj(y.transpose(1, 2))

    g_out = torch.randn(3, 29, 16)
    results = []
    for fn in (m, before):
        m.zero_grad()
        out = fn(x)
        out.backward(g_out)
        results.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for name in grads:
        want = ref_grads[name]
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda msg: f"grad {name}: {msg}")


# --------------------------------------------------------------------------- _LowRankLinearFn

def test_low_rank_linear_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_LowRankLinearFn.apply, (x, w), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_low_rank_linear_equals_f_linear():
    """Mamba's dt_rank -> d_inner projection: forward bit-identical to F.linear (the same call);
    gradients F.linear's to float32 round-off; each gradient only where asked for."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 57, 7, generator=g)
    w = torch.randn(200, 7, generator=g)
    g_out = torch.randn(4, 57, 200, generator=g)
    (out, (gx, gw, _)) = _grads(lambda x, w, b: _LowRankLinearFn.apply(x, w), x, w, None, g_out)
    (ref, (rgx, rgw, _)) = _grads(lambda x, w, b: F.linear(x, w), x, w, None, g_out)
    assert torch.equal(out, ref)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5 * rgx.abs().max().item())
    torch.testing.assert_close(gw, rgw, rtol=1e-5, atol=1e-5 * rgw.abs().max().item())
    w_only = w.clone().requires_grad_(True)
    _LowRankLinearFn.apply(x, w_only).backward(g_out)
    torch.testing.assert_close(w_only.grad, rgw, rtol=1e-5, atol=1e-5 * rgw.abs().max().item())
