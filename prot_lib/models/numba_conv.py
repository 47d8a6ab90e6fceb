r"""Mamba's causal depthwise convolution as compiled CPU kernels (numba), on time-major tensors.

:func:`prot_lib.models.mamba.causal_depthwise_conv1d` (the ``conv1d`` of every
:class:`~prot_lib.models.Mamba` block) runs :func:`numba_causal_conv1d` for float32 CPU tensors
where numba imports and ``PROT_LIB_SCAN`` is not "torch", else the same sums as torch ops. For x of
shape (batch, L, C), weight (C, 1, K) and bias (C,):

    out[b, t, c] = bias[c] + w[c, 0] x[b, t-K+1, c] + w[c, 1] x[b, t-K+2, c] + ... + w[c, K-1] x[b, t, c]

with x = 0 before t = 0: ``nn.Conv1d(C, C, K, groups=C, padding=K-1)`` cut back to the first L
outputs, which is mamba-ssm's ``conv1d`` (and the sum order of its ``causal_conv1d`` CUDA kernel:
bias first, then the taps from the oldest token). The backward (g = dl/dout):

    dl/dx[b, s, c] = sum_k w[c, k] g[b, s + K-1-k, c]     (g = 0 after L: the padding's share)
    dl/dw[c, k]    = sum_{b,t} g[b, t, c] x[b, t-K+1+k, c]   (x = 0 before 0)
    dl/dbias[c]    = sum_{b,t} g[b, t, c]

Why compiled: as torch ops the forward is K shifted multiplies and adds over (batch, L, C) and the
backward 3K more plus reductions, each a pass through memory; oneDNN's depthwise ``nn.Conv1d`` wants
the (batch, C, L) layout, whose transposed copies cost more than the convolution (issue 13's profile
of one training step, benchmarks/README.md). Here one pass reads x and writes out, one pass the
backward, with the rows of K tokens in L1. At the write-up's shape (50, 1023, 200), one thread,
forward + backward: nn.Conv1d with the old block's transposed copies 5.0-5.2x these kernels' time,
the same sums as torch ops (:func:`~prot_lib.models.mamba.causal_depthwise_conv1d` without numba)
5.0x (``python benchmarks/bench_block_ops.py``, two runs; benchmarks/README.md).

Numerics: every product is rounded before it is added (no fused multiply-add: the kernels use no
fast-math flag). Non-finite values arise where torch's float32 CPU ``nn.Conv1d`` (oneDNN) gives
them: the forward leaves out the taps that read the padding before t = 0; the backward multiplies
the zeros (the zero gradients of the outputs cut off after L by the weights, dl/dout by the zeros of
the padding), as that convolution's backward does, so an inf weight gives NaN in dl/dx at the last
K - 1 steps and an inf dl/dout NaN in dl/dweight (tests/test_conv.py checks both against nn.Conv1d). dl/dw and dl/dbias are summed over t in order,
per batch element, then over the batch by torch; the convolution sums in another order (float32
round-off apart, the same).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .buffer_pool import empty as pooled_empty
from .numba_scan import AVAILABLE, UNAVAILABLE_REASON, _flat, _jit, _run_items, channel_block

Tensor = torch.Tensor

if AVAILABLE:
    @_jit()
    def _conv_forward_items(x, sb, st, w, bias, out, has_bias, block, lo, hi):
        """Forward of work items lo..hi-1, item = b * n_blocks + j for channels [j * block, ...).
        x: flat, x[b, t, d] at x[b * sb + t * st + d] (see :func:`_flat`); w: (K, C) =
        weight[:, 0, :].T; bias: (C,); out: (batch, L, C)."""
        L = out.shape[1]
        C = out.shape[2]
        K = w.shape[0]
        zero = np.float32(0.0)
        n_blocks = (C + block - 1) // block
        for item in range(lo, hi):
            b = item // n_blocks
            d0 = (item % n_blocks) * block
            cols_lo, cols_hi = np.uint64(d0), np.uint64(min(C, d0 + block))  # unsigned: no wraparound
            for t in range(L):
                # bias first, then the taps from the oldest token; the taps that read the padding
                # before t = 0 are left out, as torch's float32 CPU nn.Conv1d leaves them out
                if has_bias:
                    for d in range(cols_lo, cols_hi):
                        out[b, t, d] = bias[d]
                else:
                    for d in range(cols_lo, cols_hi):
                        out[b, t, d] = zero
                for k in range(K):
                    s = t - (K - 1) + k
                    if s >= 0:
                        row = np.uint64(b * sb + s * st)  # unsigned: no negative-index wraparound
                        for d in range(cols_lo, cols_hi):
                            out[b, t, d] = out[b, t, d] + w[k, d] * x[row + d]

    @_jit()
    def _conv_backward_items(x, sb, st, w, g, gx, gw, gbias, want_gx, block, lo, hi):
        """Backward of work items lo..hi-1 (numbered and x read as in :func:`_conv_forward_items`).
        g: (batch, L, C) contiguous; writes gx (batch, L, C) (if want_gx), gw (batch, K, C) and
        gbias (batch, C): this batch element's share of dl/dw and dl/dbias."""
        L = g.shape[1]
        C = g.shape[2]
        K = w.shape[0]
        zero = np.float32(0.0)
        n_blocks = (C + block - 1) // block
        for item in range(lo, hi):
            b = item // n_blocks
            d0 = (item % n_blocks) * block
            cols_lo, cols_hi = np.uint64(d0), np.uint64(min(C, d0 + block))
            for d in range(cols_lo, cols_hi):
                gbias[b, d] = 0.0
            for k in range(K):
                for d in range(cols_lo, cols_hi):
                    gw[b, k, d] = 0.0
            for t in range(L):
                for d in range(cols_lo, cols_hi):
                    gbias[b, d] += g[b, t, d]
                for k in range(K):
                    s = t - (K - 1) + k
                    if s >= 0:
                        row = np.uint64(b * sb + s * st)
                        for d in range(cols_lo, cols_hi):
                            gw[b, k, d] += g[b, t, d] * x[row + d]
                    else:
                        for d in range(cols_lo, cols_hi):
                            gw[b, k, d] += g[b, t, d] * zero
            if want_gx:
                for s in range(L):
                    # k = 0 reads g[s + K - 1]: the newest output this token feeds
                    t = s + K - 1
                    if t < L:
                        for d in range(cols_lo, cols_hi):
                            gx[b, s, d] = w[0, d] * g[b, t, d]
                    else:  # outputs cut off after L: zero gradient, times the weight
                        for d in range(cols_lo, cols_hi):
                            gx[b, s, d] = w[0, d] * zero
                    for k in range(1, K):
                        t = s + K - 1 - k
                        if t < L:
                            for d in range(cols_lo, cols_hi):
                                gx[b, s, d] = gx[b, s, d] + w[k, d] * g[b, t, d]
                        else:
                            for d in range(cols_lo, cols_hi):
                                gx[b, s, d] = gx[b, s, d] + w[k, d] * zero


class _NumbaConvFn(torch.autograd.Function):
    """The kernels as an autograd function: x (batch, L, C) float32 (unit channel stride; read in
    place), weight (C, 1, K), bias (C,) or None -> (batch, L, C). Saves x and the (K, C) taps."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        batch, L, C = x.shape
        w = weight[:, 0, :].t().contiguous()  # (K, C)
        b = bias.contiguous() if bias is not None else x.new_zeros(C)
        out = pooled_empty((batch, L, C))  # memory already paged in (see buffer_pool)
        block = channel_block(batch, C)
        _run_items(_conv_forward_items, batch * (-(-C // block)), *_flat(x), w.numpy(),
                   b.detach().numpy(), out.numpy(), bias is not None, block)
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        batch, L, C = x.shape
        g = g.contiguous()
        want_gx = ctx.needs_input_grad[0]
        gx = pooled_empty(g.shape) if want_gx else g.new_empty((1, 1, 1))
        gw = g.new_empty((batch, w.shape[0], C))
        gb = g.new_empty((batch, C))
        block = channel_block(batch, C)
        _run_items(_conv_backward_items, batch * (-(-C // block)), *_flat(x), w.numpy(),
                   g.numpy(), gx.numpy(), gw.numpy(), gb.numpy(), want_gx, block)
        return (gx if want_gx else None, gw.sum(0).t().unsqueeze(1),
                gb.sum(0) if ctx.has_bias else None)


def numba_causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The causal depthwise convolution of the module docstring, by the compiled kernels.

    Args:
        x: (batch, L, C) float32 CPU tensor, any strides (a half of in_proj's output is read in
            place).
        weight: (C, 1, K) float32 (``nn.Conv1d(C, C, K, groups=C).weight``).
        bias: (C,) float32 or None.

    Returns:
        (batch, L, C) float32, contiguous; differentiable in x, weight and bias (single backward).

    Raises:
        RuntimeError: numba cannot be imported (:data:`UNAVAILABLE_REASON` says why).
    """
    if not AVAILABLE:
        raise RuntimeError(f"the compiled convolution needs numba, which cannot be imported "
                           f"({UNAVAILABLE_REASON})")
    return _NumbaConvFn.apply(x, weight, bias)
