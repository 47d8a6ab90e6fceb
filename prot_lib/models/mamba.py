"""The Mamba block (Gu & Dao 2023, "Mamba", Figure 3 and Algorithm 2), in pure PyTorch.

Mirrors ``mamba_ssm.modules.mamba_simple.Mamba`` (mamba-ssm 2.3.2) on its non-fused path, with the
same parameter names, shapes and initialisation, so a mamba-ssm ``state_dict`` loads with
``strict=True`` and gives the same output. For an input x of shape (batch, L, d_model):

    x, z   = in_proj(x)                       two branches, each (batch, d_inner, L)
    x      = silu(causal_depthwise_conv1d(x)) short local mixing along L
    delta, B, C = x_proj(x)                   input-dependent ("selective") SSM parameters, eq. (S6)
    delta  = dt_proj.weight @ delta           low-rank (dt_rank) projection back to d_inner
    A      = -exp(A_log)                      negative, so exp(delta * A) lies in (0, 1]
    y      = selective_scan(x, delta, A, B, C, D, z, delta_bias=dt_proj.bias, softplus)
    out    = out_proj(y)

Only the parallel (training) forward is provided: no recurrent ``step`` / inference cache.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .numba_conv import numba_causal_conv1d
from .selective_scan import scan_backend, selective_scan

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "mamba_ssm")
_INSTALL_HINT = "pip install prot_lib[mamba]"
# "auto" reports its choice once per process, not once per layer (a 24-layer BiMamba has 48 blocks).
_LOGGED_AUTO_CHOICES: set = set()


class MambaSSMUnavailableError(ImportError):
    """backend="mamba_ssm" was asked for but mamba-ssm's CUDA scan cannot be imported."""


def _import_mamba_ssm_scan() -> Callable:
    """Import mamba-ssm's fused CUDA scan lazily, so that CPU-only installs never touch it.

    Returns ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.

    Raises:
        MambaSSMUnavailableError: mamba-ssm is missing or its compiled extension fails to load
            (the message names ``pip install prot_lib[mamba]``).
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError) as err:  # a broken CUDA build raises ImportError or OSError
        raise MambaSSMUnavailableError(
            f"backend='mamba_ssm' needs the mamba-ssm package and its CUDA kernels, which could not "
            f"be imported ({type(err).__name__}: {err}). Install them with `{_INSTALL_HINT}` on a "
            f"machine with CUDA, or use backend='torch' (pure PyTorch, any device)."
        ) from err
    return selective_scan_fn


def resolve_backend(backend: str) -> str:
    """Turn a requested scan backend into the one that will run: "torch" or "mamba_ssm".

    Args:
        backend: "torch" (pure PyTorch :func:`prot_lib.models.selective_scan.selective_scan`),
            "mamba_ssm" (mamba-ssm's CUDA ``selective_scan_fn``), or "auto" (mamba-ssm when it
            imports AND CUDA is available, else torch; the choice is logged once per process).

    Raises:
        ValueError: unknown backend (the message names the value and the allowed ones).
        MambaSSMUnavailableError: backend="mamba_ssm" and mamba-ssm cannot be imported.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "mamba_ssm":
        _import_mamba_ssm_scan()  # fail at construction, not at the first training step
        return "mamba_ssm"
    if torch.cuda.is_available():
        try:
            _import_mamba_ssm_scan()
            choice, why = "mamba_ssm", "mamba-ssm imports and CUDA is available"
        except MambaSSMUnavailableError:
            choice, why = "torch", "mamba-ssm is not importable"
    else:
        choice, why = "torch", "CUDA is not available"
    if choice not in _LOGGED_AUTO_CHOICES:
        _LOGGED_AUTO_CHOICES.add(choice)
        logger.info("Mamba backend='auto' uses the %r selective scan (%s).", choice, why)
    return choice


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus^{-1}(x) = x + log(-expm1(-x)) = log(exp(x) - 1), stable for small x > 0.

    Mirrors the dt-bias initialisation of ``mamba_ssm.modules.mamba_simple.Mamba`` (see
    pytorch/pytorch#72759). x: any shape, > 0.
    """
    return x + torch.log(-torch.expm1(-x))


def _grad_taps(gp: torch.Tensor, taps: torch.Tensor, L: int) -> torch.Tensor:
    """dl/dx of the causal conv: sum_k taps[k] * gp[:, K-1-k : K-1-k + L] for k = 0..K-1, in that
    order, each product rounded before it is added (no fused multiply-add, which could turn an
    overflowing product into a finite sum). gp: (batch, L + K - 1, C), dl/dout followed by the K - 1
    zeros of the outputs cut off after L; taps: (K, C)."""
    K = taps.shape[0]
    out = gp[:, K - 1:K - 1 + L] * taps[0]
    tmp = torch.empty_like(out)
    for k in range(1, K):
        torch.mul(gp[:, K - 1 - k:K - 1 - k + L], taps[k], out=tmp)
        out += tmp
    return out


class _LowRankLinearFn(torch.autograd.Function):
    """x @ weight.T for a low-rank x (..., rank) and weight (out, rank), with the backward's two
    matmuls written in the operand layouts that MKL runs fast for a small rank: dl/dx = g @ W with W
    read as the transpose of a contiguous (rank, out) copy, dl/dW = (x^T g)^T. The plain forms,
    which autograd uses for F.linear, made forward + backward 1.7-2.0x slower at the write-up's shape
    (x (50, 1023, 7), weight (200, 7), one thread: ``python benchmarks/bench_block_ops.py``,
    benchmarks/README.md). Forward: ``F.linear(x, weight)`` itself.

    Shapes: x (..., rank), weight (out, rank) -> (..., out); the gradients have their inputs'
    shapes (x's contiguous). Single backward (not differentiable twice)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ weight.t().contiguous().t()).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = (x.reshape(-1, x.shape[-1]).t() @ g2).t().contiguous()
        return gx, gw


class _CausalConvFn(torch.autograd.Function):
    """Causal depthwise convolution on time-major tensors with torch ops and a hand-written
    backward (autograd through K shifted slices would build K full-size zero gradients). Where a tap
    reads the padding before t = 0 it is left out of the forward sum, as torch's float32 CPU
    ``nn.Conv1d`` (oneDNN) computes it; the backward multiplies the zeros as that convolution's
    backward does (see :func:`causal_depthwise_conv1d`)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        K, L = weight.shape[-1], x.shape[1]
        taps = weight[:, 0, :].t()  # (K, C)
        # mamba-ssm's causal_conv1d kernel starts the sum at the bias, then adds the taps from the
        # oldest token: bias + w_0 x_{t-K+1} + ... + w_{K-1} x_t; tap k is shifted by K-1-k steps
        out = x.new_zeros(x.shape) if bias is None else bias.expand(x.shape).contiguous()
        tmp = torch.empty_like(out)  # one buffer for the products (each rounded before the add)
        for k in range(K):
            shift = K - 1 - k
            if shift < L:
                prod = torch.mul(x[:, :L - shift], taps[k], out=tmp[:, :L - shift])
                out[:, shift:] += prod
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        K, L = weight.shape[-1], g.shape[1]
        g = g.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # dl/dx_s = sum_k w_k dl/dy_{s + K-1-k}; the K - 1 zeros after L stand for the outputs
            # cut off after L, whose zero gradients nn.Conv1d's backward multiplies by the weights
            gx = _grad_taps(F.pad(g, (0, 0, 0, K - 1)), weight[:, 0, :].t(), L)
        if ctx.needs_input_grad[1]:
            xp = F.pad(x, (0, 0, K - 1, 0))  # (batch, K - 1 zeros + L, C): the padding, multiplied
            tmp = torch.empty_like(g)
            gw = torch.stack([torch.mul(g, xp[:, k:k + L], out=tmp).sum((0, 1)) for k in range(K)],
                             dim=-1).unsqueeze(1)  # (C, 1, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 1))
        return gx, gw, gb


def causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal depthwise convolution along L of a time-major sequence.

    out[b, t, c] = bias[c] + sum_{k=0}^{K-1} weight[c, 0, k] * x[b, t - (K-1) + k, c], with x = 0
    before t = 0: exactly ``nn.Conv1d(C, C, K, groups=C, padding=K-1)(x.transpose(1, 2))[..., :L]``
    transposed back (mamba-ssm's ``conv1d`` and ``causal_conv1d_fn``), but read and written in the
    (batch, L, C) layout, so that no transposed copy is made, with the sum in the causal_conv1d
    kernel's order (bias first, then the taps from the oldest token).

    Non-finite weights give what torch's float32 CPU ``nn.Conv1d`` (oneDNN, the path of the
    models before this function and of every run in the book) gives: the forward leaves out the
    taps that read the padding before t = 0 (an inf or NaN weight does not reach the first K - 1
    outputs through them), and the backward multiplies the zeros, as that convolution's backward
    does: dl/dx at the last K - 1 steps gets ``weight * 0`` from the outputs cut off after L (NaN
    for an inf weight), dl/dweight gets ``dl/dout * 0`` from the padding (NaN for an inf gradient).
    (torch's float64 CPU convolution multiplies the padding in the forward too; measured with torch
    2.13, tests/test_conv.py.)

    Args:
        x: (batch, L, C), any strides.
        weight: (C, 1, K), as ``nn.Conv1d(C, C, K, groups=C).weight``.
        bias: (C,) or None.

    Returns:
        (batch, L, C), contiguous, x's dtype; differentiable in x, weight and bias (once: the
        backward is not itself differentiable). Float32 CPU tensors go to the compiled kernels of
        :mod:`.numba_conv` where :func:`~.selective_scan.scan_backend` says "numba", everything
        else to the same sums as torch ops.

    Raises:
        ValueError: shapes that do not fit (the message names them).
    """
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[1] != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"causal_depthwise_conv1d needs x (batch, L, C) and weight (C, 1, K), got "
                         f"x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must be (C={x.shape[-1]},), got {tuple(bias.shape)}")
    tensors = [t for t in (x, weight, bias) if t is not None]
    if (scan_backend(x.device) == "numba" and all(t.dtype == torch.float32 for t in tensors)
            and all(t.device.type == "cpu" for t in tensors)):
        return numba_causal_conv1d(x, weight, bias)
    return _CausalConvFn.apply(x, weight, bias)


class CausalConv1d(nn.Conv1d):
    """mamba-ssm's ``conv1d`` (``nn.Conv1d(C, C, K, groups=C, padding=K-1)``, output cut back to
    the first L steps) on time-major input: (batch, L, C) -> (batch, L, C).

    An ``nn.Conv1d`` with mamba-ssm's arguments, so its parameters (``weight`` (C, 1, K), ``bias``
    (C,)), their initialisation and the state_dict are mamba-ssm's; only :meth:`forward` differs:
    it takes and returns (batch, L, C) and computes :func:`causal_depthwise_conv1d`. Hooks on the
    module see that time-major input and output.

    Args:
        channels: C (d_inner in a Mamba block).
        kernel_size: K (d_conv).
        bias: learn a bias per channel.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(channels, channels, kernel_size=kernel_size, groups=channels,
                         padding=kernel_size - 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, L, C), any strides -> (batch, L, C) contiguous."""
        return causal_depthwise_conv1d(x, self.weight, self.bias)


class Mamba(nn.Module):
    """One Mamba (S6) block: (batch, L, d_model) -> (batch, L, d_model).

    Mirrors ``mamba_ssm.modules.mamba_simple.Mamba`` (mamba-ssm 2.3.2), non-fused path; parameter
    names: ``A_log, D, in_proj.weight, conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight,
    dt_proj.bias, out_proj.weight`` (plus ``in_proj.bias, out_proj.bias`` when ``bias=True``).

    Args:
        d_model: width of the residual stream (channels per token).
        d_state: N, the SSM state size per channel.
        d_conv: kernel width of the causal depthwise convolution (tokens).
        expand: d_inner = int(expand * d_model).
        dt_rank: rank of the delta projection; "auto" = ceil(d_model / 16).
        dt_min, dt_max: range of the initial step size softplus(dt_proj.bias), sampled
            log-uniformly (in units of the discretisation step, dimensionless).
        dt_init: "random" (dt_proj.weight ~ U(-s, s)) or "constant" (= s), s = dt_rank**-0.5 * dt_scale.
        dt_scale: multiplies s.
        dt_init_floor: lower clamp of the initial step size.
        conv_bias: bias in the depthwise convolution.
        bias: bias in in_proj and out_proj.
        backend: "auto", "torch" or "mamba_ssm"; see :func:`resolve_backend`. ``self.backend``
            holds the resolved one.

    Raises:
        ValueError: unknown ``backend``, ``dt_init``, or non-positive sizes.
        MambaSSMUnavailableError: backend="mamba_ssm" without an importable mamba-ssm.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.requested_backend = backend
        self.backend = resolve_backend(backend)
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        # mamba-ssm's nn.Conv1d (depthwise, padding d_conv - 1, cut back to L: causal), with its
        # parameters and initialisation, computed on time-major input (see CausalConv1d).
        self.conv1d = CausalConv1d(self.d_inner, kernel_size=d_conv, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        # Keep delta's variance at initialisation independent of dt_rank.
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)

        # The step size starts log-uniform in [dt_min, dt_max]: the bias is set so that
        # softplus(bias) hits that draw, i.e. its inverse softplus.
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus(dt))
        # A generic "zero every Linear bias" init would erase the dt range; see reinit_linear_biases.
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation A_n = -(n + 1); stored as log so that A = -exp(A_log) stays < 0
        # whatever the optimiser does, and exp(delta * A) stays in (0, 1].
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # decaying A_log towards 0 would pull every A_n to -1

        self.D = nn.Parameter(torch.ones(self.d_inner))  # the skip y += D * u
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _scan(self, u: torch.Tensor) -> Callable:
        if self.backend == "mamba_ssm" and u.is_cuda:
            return _import_mamba_ssm_scan()
        if self.backend == "mamba_ssm" and self.requested_backend == "mamba_ssm":
            raise RuntimeError(f"backend='mamba_ssm' runs on CUDA tensors only, got device {u.device}; "
                               f"move the model to CUDA or use backend='torch'")
        return selective_scan  # "auto" on CPU tensors, or "torch"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            hidden_states: (batch, L, d_model) float tensor.

        Returns:
            (batch, L, d_model), same dtype as the output projection.

        Raises:
            ValueError: input is not 3-D or its last dimension is not d_model.
            RuntimeError: backend="mamba_ssm" with CPU tensors.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"hidden_states must be (batch, L, d_model={self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        # Time-major throughout: every tensor is (batch, L, channels) in memory, which is what the
        # projections produce and read, what the causal conv walks along, and what the compiled scan
        # reads without a copy; the scan's (batch, d_inner, L) arguments are transposed views.
        xz = self.in_proj(hidden_states)  # (batch, L, 2 * d_inner)
        x, z = xz.chunk(2, dim=-1)  # (batch, L, d_inner) views; z is the gate
        x = F.silu(self.conv1d(x))  # (batch, L, d_inner)

        x_dbl = self.x_proj(x)  # (batch, L, dt_rank + 2 * d_state)
        delta, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # No bias here: the scan adds dt_proj.bias before its softplus, as mamba-ssm does. The
        # low-rank part is made contiguous (dt_rank columns: cheap) for the backward's matmuls.
        delta = _LowRankLinearFn.apply(delta.contiguous(), self.dt_proj.weight)  # (batch, L, d_inner)
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state), < 0

        y = self._scan(x)(x.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                          C.transpose(1, 2), self.D.float(), z=z.transpose(1, 2),
                          delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"d_inner={self.d_inner}, dt_rank={self.dt_rank}, backend={self.backend!r}")


def reinit_linear_biases(module: nn.Module) -> List[str]:
    """Zero every ``nn.Linear`` bias in ``module`` except those marked ``_no_reinit``.

    Mirrors the bias rule of ``mamba_ssm.models.mixer_seq_simple._init_weights``: a generic
    re-initialisation must skip ``Mamba.dt_proj.bias``, which encodes the initial step-size range
    (zeroing it would set every delta to softplus(0) = 0.69, far above dt_max = 0.1).

    Args:
        module: any module (searched recursively).

    Returns:
        The qualified names of the biases that were zeroed.
    """
    zeroed = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            if not getattr(sub.bias, "_no_reinit", False):
                nn.init.zeros_(sub.bias)
                zeroed.append(f"{name}.bias" if name else "bias")
    return zeroed
