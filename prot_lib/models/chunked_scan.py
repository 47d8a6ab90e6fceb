r"""A fast, exact S6 selective scan in pure PyTorch: the recurrence streamed chunk by chunk.

This is the CPU path of :func:`prot_lib.models.selective_scan.selective_scan` where the compiled
kernels of :mod:`prot_lib.models.numba_scan` are unavailable (numba not importable) or switched off
(``PROT_LIB_SCAN=torch``), and the path for tensors on other devices. It computes the recurrence
only, on prepared float32 tensors; :func:`prot_lib.models.selective_scan.selective_scan_chunked`
wraps it in mamba-ssm's ``selective_scan_ref`` contract (delta bias and softplus, D skip, silu gate).
:func:`~prot_lib.models.selective_scan.selective_scan_reference` keeps the plain sequential loop for
reading and for tests.

The recurrence (Gu & Dao 2023, "Mamba", Algorithm 2 with eq. 2a and 4; mamba-ssm's
``selective_scan_ref``), per batch element, channel d and state n, written with the paper's
input x_t (``u`` in the code, as in mamba-ssm), Abar_t = exp(Delta_t A) and Bbar_t = Delta_t B_t
(the simplification of eq. 4's zero-order hold that mamba-ssm's reference makes):

    h_t = Abar_t * h_{t-1} + Delta_t B_t x_t,    h_0 = 0               (state, (d_inner, d_state))
    y_t = sum_n C_{t,n} h_{t,n}                                         (output, (d_inner,))

Why a hand-written backward
---------------------------
Autograd through a Python loop over t records L small graphs; indexing ``deltaA[:, :, i]`` inside
the loop (as ``selective_scan_ref`` does) even makes every step's backward allocate a full-size
zero gradient, an O(L^2) backward. Here one :class:`torch.autograd.Function` does the whole scan:

* forward: for each chunk of T steps (T = ``chunk_size``, 8-64) it builds Abar and Delta B x for that
  chunk only, runs the T steps in place (one fused multiply-add per step on a (batch, d_state,
  d_inner) slice), reduces y_t = C_t . h_t for the chunk with one batched matmul, and saves only the
  state entering each chunk: L / T states instead of L.
* backward: chunks are visited last to first; each chunk's Abar, Delta B x and h are recomputed from
  its saved entry state, then the adjoint recurrence runs backwards through the chunk.

The adjoint (derived for this module; G_t is the total derivative of the loss l w.r.t. h_t)
------------------------------------------------------------------------------------------
Since h_{t+1} depends on h_t through Abar_{t+1} * h_t and y_t = C_t . h_t,

    G_t = C_t dl/dy_t + Abar_{t+1} * G_{t+1},     G_L = C_L dl/dy_L + dl/dh_L (the last state's grad)

which runs backwards with the same decays Abar in (0, 1]. With P_t = G_t * h_{t-1} * Abar_t
(= dl/d(Delta_t A), the exp's chain rule applied), the gradients are

    dl/dC_{t,n}    = sum_d dl/dy_{t,d} h_{t,d,n}
    dl/dA_{d,n}    = sum_{batch,t} Delta_{t,d} P_{t,d,n}
    dl/dDelta_{t,d} = sum_n A_{d,n} P_{t,d,n} + x_{t,d} sum_n B_{t,n} G_{t,d,n}
    dl/dx_{t,d}    = Delta_{t,d} sum_n B_{t,n} G_{t,d,n}
    dl/dB_{t,n}    = sum_d Delta_{t,d} x_{t,d} G_{t,d,n}

Across a chunk boundary only Abar_s G_s (s = first step of the chunk to the right) is carried.
The products are grouped as the reference's autograd groups them (it forms Delta B x as
(Delta B) x): dl/dx = sum_n G (Delta B), dl/dDelta gets sum_n B (G x), dl/dB = sum_d Delta (G x).

Numerics: no closed forms
-------------------------
Chunked "parallel" closed forms that divide by the cumulative product of Abar (exp of a cumulative
sum of Delta A), or that scan in log space, are unsafe in float32: exp underflows to 0 and 1/exp
overflows to inf once the cumulative sum passes about -88, giving 0 * inf = NaN
(MzeroMiko/mamba-mini#6). This scan only ever multiplies by Abar in (0, 1] (for Delta >= 0, A <= 0),
so no intermediate can overflow where the true result is finite. The elementwise products follow the
reference's order (Abar = exp(Delta A), Delta B x = (Delta B) x, P = (G h) Abar), so where the
reference overflows (huge inputs) this scan produces the same inf/NaN instead of hiding them. Only
sums are associated differently (float32 round-off, ~1e-7 relative) and the per-step update is a
fused multiply-add. At one edge the order shows: where finite terms of ~1e38 are summed, partial
sums overflow in one order and not in another, so the reference may give NaN (-inf + inf) where
this scan gives inf (tests/test_scan.py has such a case); no summation order is exempt from that.
(Abar <= 1 needs Delta >= 0 and A <= 0, the model's case; for other inputs, e.g. golden case 2
without softplus, the scan computes what the reference computes.)

Memory: besides time-major copies of x, Delta, B, C (batch * L * (d_inner or d_state) each), the
forward saves L / T states of (batch, d_state, d_inner); the workspace is two (forward) or five
(backward) chunk buffers of T * batch * d_inner * d_state floats. No (batch, d_inner, d_state, L)
tensor is ever held.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

Tensor = torch.Tensor

# Elements (T * batch * d_inner * d_state) of one chunk buffer that the default chunk length aims at:
# large enough that the per-chunk ops amortise Python overhead, small enough that the chunk buffers
# stay near the CPU caches. Tuned with benchmarks/bench_scan.py on a 2-core AVX-512 machine.
_TARGET_CHUNK_ELEMENTS = 1 << 18
_MIN_CHUNK, _MAX_CHUNK = 8, 64


def default_chunk_size(batch: int, d_inner: int, d_state: int) -> int:
    """The chunk length T used when ``chunk_size`` is None: the largest power of two in [8, 64]
    whose chunk buffer (T * batch * d_inner * d_state floats) holds at most 2**18 floats (1 MiB),
    else 8."""
    per_step = max(1, batch * d_inner * d_state)
    T = _MIN_CHUNK
    while T < _MAX_CHUNK and 2 * T * per_step <= _TARGET_CHUNK_ELEMENTS:
        T *= 2
    return T


def _chunk_bounds(L: int, T: int) -> List[Tuple[int, int]]:
    return [(s, min(s + T, L)) for s in range(0, L, T)]


class _Workspace:
    """Flat buffers reused by every chunk; ``view(i, m)`` is buffer i as (m, batch, d_state, d_inner)."""

    def __init__(self, like: Tensor, count: int, T: int, batch: int, d_state: int, d_inner: int):
        self.shape = (batch, d_state, d_inner)
        step = batch * d_state * d_inner
        self.step = step
        self.bufs = [like.new_empty(T * step) for _ in range(count)]

    def view(self, i: int, m: int) -> Tensor:
        return self.bufs[i][: m * self.step].view(m, *self.shape)


def _discretize(dA: Tensor, dBx: Tensor, dt: Tensor, xt: Tensor, At: Tensor, Bt: Tensor,
                s: int, e: int, dB: Optional[Tensor] = None) -> None:
    """dA <- exp(Delta A), dBx <- (Delta B) x (and dB <- Delta B if given) for steps s:e, all
    (m, batch, d_state, d_inner).

    The products are formed in ``selective_scan_ref``'s order, so overflow happens where it does there.
    """
    torch.mul(dt[s:e, :, None, :], At, out=dA)
    dA.exp_()
    dB = dBx if dB is None else dB
    torch.mul(dt[s:e, :, None, :], Bt[s:e, :, :, None], out=dB)
    torch.mul(dB, xt[s:e, :, None, :], out=dBx)


def _run_chunk(dA: Tensor, h: Tensor, h0: Tensor) -> None:
    """In place: h[t] <- dA[t] * h[t-1] + h[t], with h[-1] = h0. On entry h holds Delta B x."""
    h[0].addcmul_(dA[0], h0)
    for t in range(1, h.shape[0]):
        h[t].addcmul_(dA[t], h[t - 1])


def _scan_forward(dt: Tensor, xt: Tensor, At: Tensor, Bt: Tensor, Ct: Tensor, T: int,
                  save_states: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Forward over time-major inputs; returns y (L, batch, d_inner), h_L (batch, d_state, d_inner)
    and, with ``save_states``, the state entering each chunk (n_chunks, batch, d_state, d_inner)."""
    L, batch, d_inner = dt.shape
    d_state = At.shape[0]
    chunks = _chunk_bounds(L, T)
    ws = _Workspace(dt, 2, T, batch, d_state, d_inner)
    y = dt.new_empty((L, batch, d_inner))
    h = dt.new_zeros((batch, d_state, d_inner))
    starts = dt.new_empty((len(chunks), batch, d_state, d_inner)) if save_states else None
    for c, (s, e) in enumerate(chunks):
        m = e - s
        dA, hc = ws.view(0, m), ws.view(1, m)
        _discretize(dA, hc, dt, xt, At, Bt, s, e)
        if starts is not None:
            starts[c].copy_(h)
        _run_chunk(dA, hc, h)
        torch.matmul(Ct[s:e, :, None, :], hc, out=y[s:e, :, None, :])  # y_t = C_t . h_t
        h.copy_(hc[m - 1])  # the buffers are overwritten by the next chunk
    return y, h, starts


class _ChunkedScanFn(torch.autograd.Function):
    """Core recurrence on time-major float32 tensors: dt, xt (L, batch, d_inner); At (d_state,
    d_inner) = A.T; Bt, Ct (L, batch, d_state). Returns y (L, batch, d_inner) and h_L
    (batch, d_state, d_inner). Single backward only (no double backward)."""

    @staticmethod
    def forward(ctx, dt, xt, At, Bt, Ct, T):
        y, last, starts = _scan_forward(dt, xt, At, Bt, Ct, T, save_states=True)
        ctx.save_for_backward(dt, xt, At, Bt, Ct, starts)
        ctx.T = T
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, glast):
        dt, xt, At, Bt, Ct, starts = ctx.saved_tensors
        T = ctx.T
        L, batch, d_inner = dt.shape
        d_state = At.shape[0]
        need_A, need_B, need_C = ctx.needs_input_grad[2:5]
        gy = dt.new_zeros((L, batch, d_inner)) if gy is None else gy.contiguous()
        g_dt = torch.empty_like(dt)
        g_xt = torch.empty_like(xt)
        g_At = torch.zeros_like(At) if need_A else None
        g_Bt = torch.empty_like(Bt) if need_B else None
        g_Ct = torch.empty_like(Ct) if need_C else None
        ws = _Workspace(dt, 5, T, batch, d_state, d_inner)
        Q = dt.new_empty((T, batch, d_inner))
        carry = glast  # Abar_s * G_s from the chunk to the right (the last state's grad at first)
        chunks = _chunk_bounds(L, T)
        for c in range(len(chunks) - 1, -1, -1):
            s, e = chunks[c]
            m = e - s
            dA, dB, h, G, P = (ws.view(i, m) for i in range(5))
            h0 = starts[c]
            _discretize(dA, h, dt, xt, At, Bt, s, e, dB=dB)
            _run_chunk(dA, h, h0)
            if need_C:
                torch.matmul(gy[s:e, :, None, :], h.transpose(-1, -2), out=g_Ct[s:e, :, None, :])
            # adjoint: G_t = C_t dy_t + Abar_{t+1} G_{t+1}
            torch.mul(Ct[s:e, :, :, None], gy[s:e, :, None, :], out=G)
            if carry is not None:
                G[m - 1].add_(carry)
            for t in range(m - 2, -1, -1):
                G[t].addcmul_(dA[t + 1], G[t + 1])
            carry = dA[0] * G[0]
            # P_t = (G_t h_{t-1}) Abar_t = dl/d(Delta_t A)
            torch.mul(G[1:], h[:-1], out=P[1:])
            torch.mul(G[0], h0, out=P[0])
            P.mul_(dA)
            # h is free now: it holds the products that are summed
            torch.sum(torch.mul(P, At, out=h), dim=2, out=g_dt[s:e])
            if need_A:
                g_At.add_(torch.sum(torch.mul(P, dt[s:e, :, None, :], out=h), dim=(0, 1)))
            # Delta B x = (Delta B) x, differentiated as the reference's autograd does
            torch.sum(dB.mul_(G), dim=2, out=g_xt[s:e])  # dl/dx = sum_n G (Delta B)
            G.mul_(xt[s:e, :, None, :])  # dl/d(Delta B) = G x
            Qc = Q[:m]
            torch.matmul(Bt[s:e, :, None, :], G, out=Qc[:, :, None, :])
            g_dt[s:e].add_(Qc)  # + sum_n B (G x)
            if need_B:
                torch.matmul(dt[s:e, :, None, :], G.transpose(-1, -2), out=g_Bt[s:e, :, None, :])
        return g_dt, g_xt, g_At, g_Bt, g_Ct, None


def chunked_recurrence(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       chunk_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The S6 recurrence, chunked with a hand-written adjoint; exact to float32 round-off.

    Args:
        u, delta: (batch, d_inner, L) float32, delta already biased and softplus'd.
        A: (d_inner, d_state) float32.
        B, C: (batch, d_state, L) float32 (input-dependent).
        chunk_size: steps per chunk T; None picks :func:`default_chunk_size`. Any T >= 1 gives the
            same result up to float32 round-off.

    Returns:
        y: (batch, d_inner, L) float32 with y_t = C_t . h_t; last_state: (batch, d_inner, d_state).

    Raises:
        ValueError: ``chunk_size`` < 1.
    """
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, d_inner, L = u.shape
    d_state = A.shape[1]
    T = max(1, min(L, int(chunk_size) if chunk_size is not None
                   else default_chunk_size(batch, d_inner, d_state)))
    # time-major copies: every step's slice and every chunk is then one contiguous block
    dt = delta.permute(2, 0, 1).contiguous()
    xt = u.permute(2, 0, 1).contiguous()
    Bt = B.permute(2, 0, 1).contiguous()
    Ct = C.permute(2, 0, 1).contiguous()
    At = A.t().contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (dt, xt, At, Bt, Ct)):
        y, last = _ChunkedScanFn.apply(dt, xt, At, Bt, Ct, T)
    else:  # inference: nothing to save
        y, last, _ = _scan_forward(dt, xt, At, Bt, Ct, T, save_states=False)
    return y.permute(1, 2, 0), last.transpose(1, 2).contiguous()
