"""The S6 selective scan (Gu & Dao 2023, "Mamba", Algorithm 2 and eq. 2a-2b, 4).

For each channel d and state n the recurrence is, with zero-order-hold discretisation,

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (state, (d_inner, d_state))
    y_t = C_t . h_t + D * u_t                                       (output, (d_inner,))
    out = y * silu(z)                                               (optional gate)

Two implementations share one contract, that of mamba-ssm's
``mamba_ssm.ops.selective_scan_interface.selective_scan_ref``:

- :func:`selective_scan_reference`: the readable sequential loop, written as the reference is
  (including its per-step indexing ``deltaA[:, :, i]``), kept for reading and for tests.
- :func:`selective_scan`: the path the models use. It is the fast exact scan of
  :mod:`prot_lib.models.chunked_scan` where that module is present, else the same loop with
  ``.unbind`` indexing (bit-identical to the reference, much faster to differentiate: indexing
  inside a loop makes autograd build a full-size zero gradient per step).

Since exp(delta*A) lies in (0, 1] for delta >= 0 and A < 0, the scan itself cannot overflow; large
outputs come from large inputs (u, delta, B, C), which is the story of the book.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
ScanOut = Union[Tensor, Tuple[Tensor, Tensor]]


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor]) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, d_inner, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must be (d_inner={d_inner}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            if t.shape != (batch, d_state, L):
                raise ValueError(f"{name} must be (batch, d_state, L) = {(batch, d_state, L)}, got {tuple(t.shape)}")
        elif t.dim() == 2:
            if t.shape != (d_inner, d_state):
                raise ValueError(f"time-invariant {name} must be (d_inner, d_state), got {tuple(t.shape)}")
        else:
            raise ValueError(f"{name} must be 2-D or 3-D, got shape {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d_inner,):
            raise ValueError(f"{name} must be (d_inner={d_inner},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """Cast to float32 and apply the delta bias and softplus, as the reference does."""
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A.float(), B.float(), C.float()


def _finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor], dtype_in: torch.dtype) -> Tensor:
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype=dtype_in)


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                             delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                             return_last_state: bool = False) -> ScanOut:
    """Sequential S6 scan, step by step; the readable reference.

    Mirrors ``mamba_ssm.ops.selective_scan_interface.selective_scan_ref`` (mamba-ssm 2.3.2) for real
    A and 3-D (input-dependent) or 2-D (time-invariant) B and C, including its per-step indexing.

    Args:
        u: (batch, d_inner, L) input sequence, any float dtype.
        delta: (batch, d_inner, L) step size before bias/softplus (the paper's Delta).
        A: (d_inner, d_state) state matrix (diagonal per channel), negative for a stable scan.
        B: (batch, d_state, L) input-dependent input matrix (or (d_inner, d_state) time-invariant).
        C: (batch, d_state, L) input-dependent output matrix (or (d_inner, d_state)).
        D: (d_inner,) skip connection, optional.
        z: (batch, d_inner, L) gate, optional; the output is multiplied by silu(z).
        delta_bias: (d_inner,) added to delta before softplus, optional.
        delta_softplus: apply softplus to delta (+ bias).
        return_last_state: also return the final state h_L.

    Returns:
        out: (batch, d_inner, L) in u's dtype (computed in float32); with ``return_last_state``,
        also last_state: (batch, d_inner, d_state) float32.

    Raises:
        ValueError: a shape does not match the contract (the message names the argument).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, d_inner, L = u.shape
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        deltaB_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    x = A.new_zeros((batch, d_inner, A.shape[1]))
    ys = []
    for i in range(L):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        if C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,dn->bd", x, C)
        ys.append(y)
    out = _finish(torch.stack(ys, dim=2), u, D, z, dtype_in)
    return (out, x) if return_last_state else out


def selective_scan_unbind(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                          delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                          return_last_state: bool = False) -> ScanOut:
    """The reference loop with ``.unbind`` instead of per-step indexing.

    Bit-identical to :func:`selective_scan_reference` (same operations in the same order); its
    backward is O(L) instead of O(L^2) because autograd no longer materialises a full-size zero
    gradient for every indexed slice. Same arguments, returns and errors as the reference.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, d_inner, L = u.shape
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A)).unbind(2)
    if B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u).unbind(2)
    else:
        deltaB_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u).unbind(2)
    Cs = C.unbind(2) if C.dim() == 3 else None
    x = A.new_zeros((batch, d_inner, A.shape[1]))
    ys = []
    for i in range(L):
        x = deltaA[i] * x + deltaB_u[i]
        if Cs is not None:
            y = torch.einsum("bdn,bn->bd", x, Cs[i])
        else:
            y = torch.einsum("bdn,dn->bd", x, C)
        ys.append(y)
    out = _finish(torch.stack(ys, dim=2), u, D, z, dtype_in)
    return (out, x) if return_last_state else out


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False) -> ScanOut:
    """The S6 selective scan used by :class:`prot_lib.models.Mamba`.

    Same contract as :func:`selective_scan_reference` (and mamba-ssm's ``selective_scan_ref``):
    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
    D, delta_bias: (d_inner,). Returns (batch, d_inner, L), plus the last state
    (batch, d_inner, d_state) when ``return_last_state``. Computed in float32.
    """
    return _fast_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                      delta_softplus=delta_softplus, return_last_state=return_last_state)


try:  # the chunked autograd scan (issue: fast exact CPU scan); falls back to the unbind loop
    from .chunked_scan import selective_scan_chunked as _fast_scan  # noqa: E402
except ImportError:  # pragma: no cover - only while the chunked scan is absent
    _fast_scan = selective_scan_unbind
