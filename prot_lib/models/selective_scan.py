"""The S6 selective scan (Gu & Dao 2023, "Mamba", Algorithm 2 and eq. 2a-2b, 4).

For each channel d and state n the recurrence is, with zero-order-hold discretisation,

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (state, (d_inner, d_state))
    y_t = C_t . h_t + D * u_t                                       (output, (d_inner,))
    out = y * silu(z)                                               (optional gate)

Every implementation here shares one contract, that of mamba-ssm's
``mamba_ssm.ops.selective_scan_interface.selective_scan_ref``:

- :func:`selective_scan_reference`: the readable sequential loop, written as the reference is
  (including its per-step indexing ``deltaA[:, :, i]``), kept for reading and for tests.
- :func:`selective_scan_unbind`: the same loop with ``.unbind`` indexing (bit-identical to the
  reference, much faster to differentiate: indexing inside a loop makes autograd build a full-size
  zero gradient per step); the path for time-invariant (2-D) B and C.
- :func:`selective_scan_numba`: the recurrence and its adjoint as compiled CPU kernels
  (:mod:`prot_lib.models.numba_scan`); needs numba.
- :func:`selective_scan_chunked`: the recurrence streamed chunk by chunk with torch ops and a
  hand-written adjoint (:mod:`prot_lib.models.chunked_scan`); pure PyTorch, any device.
- :func:`selective_scan`: the path the models use: the numba kernels for CPU tensors where numba
  imports, else the chunked scan (:func:`scan_backend` says which; ``PROT_LIB_SCAN=torch`` forces
  the chunked scan, ``PROT_LIB_SCAN=numba`` makes a missing numba an error).

Dependencies run one way: this module wraps the recurrences of ``chunked_scan`` and ``numba_scan``
(which know nothing of it) in the contract's delta bias and softplus, D skip and silu gate.

Since exp(delta*A) lies in (0, 1] for delta >= 0 and A < 0, the scan itself cannot overflow; large
outputs come from large inputs (u, delta, B, C), which is the story of the book.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import numba_scan
from .chunked_scan import chunked_recurrence

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
ScanOut = Union[Tensor, Tuple[Tensor, Tensor]]

#: Environment variable choosing the CPU scan: "auto" (default), "numba" or "torch".
SCAN_ENV = "PROT_LIB_SCAN"
SCAN_CHOICES = ("auto", "numba", "torch")
_LOGGED_FALLBACK: set = set()


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


def _with_contract(recurrence: Callable[..., Tuple[Tensor, Tensor]], u: Tensor, delta: Tensor,
                   A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                   delta_bias: Optional[Tensor], delta_softplus: bool,
                   return_last_state: bool) -> ScanOut:
    """Run ``recurrence(u, delta, A, B, C) -> (y, last_state)`` on prepared float32 inputs inside
    the reference's contract (shape checks, delta bias and softplus, D skip, silu gate, dtype).
    Time-invariant (2-D) B or C go to :func:`selective_scan_unbind`."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if B.dim() != 3 or C.dim() != 3:
        return selective_scan_unbind(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                     delta_softplus=delta_softplus,
                                     return_last_state=return_last_state)
    dtype_in = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    y, last = recurrence(u, delta, A, B, C)
    out = _finish(y, u, D, z, dtype_in)
    return (out, last) if return_last_state else out


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                           delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                           return_last_state: bool = False,
                           chunk_size: Optional[int] = None) -> ScanOut:
    """S6 selective scan with the pure-PyTorch chunked recurrence (:mod:`.chunked_scan`); exact to
    float32 round-off, any device.

    Same arguments, returns and errors as :func:`selective_scan_reference`, plus ``chunk_size``
    (steps per chunk T; None picks :func:`.chunked_scan.default_chunk_size`; ValueError if < 1).
    Time-invariant (2-D) B or C are handled by :func:`selective_scan_unbind`.
    """
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _with_contract(lambda *a: chunked_recurrence(*a, chunk_size=chunk_size), u, delta, A, B,
                          C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_scan_numba(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                         delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                         return_last_state: bool = False,
                         chunk_size: Optional[int] = None) -> ScanOut:
    """S6 selective scan with the compiled CPU kernels (:mod:`.numba_scan`); exact to float32
    round-off.

    Same arguments, returns and errors as :func:`selective_scan_reference`, plus ``chunk_size``
    (steps between the states saved for the backward; default 32; ValueError if < 1). Time-invariant
    (2-D) B or C are handled by :func:`selective_scan_unbind`.

    Raises:
        RuntimeError: numba cannot be imported (the message says why), or a tensor is not on the CPU.
    """
    if not numba_scan.AVAILABLE:
        raise RuntimeError(f"selective_scan_numba needs numba, which cannot be imported "
                           f"({numba_scan.UNAVAILABLE_REASON}); use selective_scan_chunked")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if u.device.type != "cpu":
        raise RuntimeError(f"selective_scan_numba runs on CPU tensors only, got device {u.device}")
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if B.dim() != 3 or C.dim() != 3:
        return selective_scan_unbind(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                     delta_softplus=delta_softplus,
                                     return_last_state=return_last_state)
    dtype_in = u.dtype
    f32 = [None if t is None else t.float() for t in (u, delta, A, B, C, D, z, delta_bias)]
    # the kernels do the contract's ops too (bias, softplus, D skip, gate), in _prepare's and
    # _finish's order, so that no (batch, d_inner, L) intermediate goes through memory
    out, last = numba_scan.numba_scan(*f32, delta_softplus=delta_softplus, chunk_size=chunk_size)
    out = out.to(dtype=dtype_in)
    return (out, last) if return_last_state else out


def scan_backend(device: Union[str, torch.device] = "cpu") -> str:
    """The recurrence :func:`selective_scan` runs for tensors on ``device``: "numba" or "torch".

    Read from ``$PROT_LIB_SCAN`` at each call: "auto" (default; numba on CPU where it imports,
    else torch, logged once), "numba" (an error where numba cannot be imported), "torch" (the
    pure-PyTorch chunked scan). Tensors on other devices always use "torch".

    Raises:
        ValueError: ``$PROT_LIB_SCAN`` is none of "auto", "numba", "torch".
        RuntimeError: ``PROT_LIB_SCAN=numba`` and numba cannot be imported.
    """
    choice = os.environ.get(SCAN_ENV, "auto").strip().lower() or "auto"
    if choice not in SCAN_CHOICES:
        raise ValueError(f"{SCAN_ENV} must be one of {SCAN_CHOICES}, got {choice!r}")
    if choice == "torch" or torch.device(device).type != "cpu":
        return "torch"
    if numba_scan.AVAILABLE:
        return "numba"
    if choice == "numba":
        raise RuntimeError(f"{SCAN_ENV}=numba, but numba cannot be imported ({numba_scan.UNAVAILABLE_REASON})")
    if not _LOGGED_FALLBACK:
        _LOGGED_FALLBACK.add(True)
        logger.warning("numba cannot be imported (%s): the selective scan uses the slower pure-PyTorch "
                       "chunked scan (pip install numba for the compiled one).", numba_scan.UNAVAILABLE_REASON)
    return "torch"


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False) -> ScanOut:
    """The S6 selective scan used by :class:`prot_lib.models.Mamba`.

    Same contract as :func:`selective_scan_reference` (and mamba-ssm's ``selective_scan_ref``):
    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L) or
    time-invariant (d_inner, d_state); D, delta_bias: (d_inner,). Returns (batch, d_inner, L), plus
    the last state (batch, d_inner, d_state) when ``return_last_state``. Computed in float32 by
    :func:`selective_scan_numba` or :func:`selective_scan_chunked`, as :func:`scan_backend` says.

    Raises:
        ValueError: a shape does not match the contract, or ``$PROT_LIB_SCAN`` is unknown.
        RuntimeError: ``PROT_LIB_SCAN=numba`` without an importable numba.
    """
    fn = selective_scan_numba if scan_backend(u.device) == "numba" else selective_scan_chunked
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              return_last_state=return_last_state)
