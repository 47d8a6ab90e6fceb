"""Gradient norms that do not overflow, measured once per optimizer step and shared.

**Why float64.** ``torch.nn.utils.get_total_norm`` and ``clip_grad_norm_`` reduce in the gradients' dtype:
in float32 the squares overflow once a norm exceeds ~1.8e19 (sqrt of float32's max 3.4e38), so the
total norm is ``inf`` while every gradient element is finite
(``get_total_norm([torch.full((10,), 1e19)])`` is inf; the true norm is 3.2e19). Counting such a step as
"non-finite gradient" misplaces the failure (the loss is finite, the weights stay finite). Here each
tensor's norm is taken by ``torch._foreach_norm`` in its own dtype (one fused kernel, as
``get_total_norm`` does), the per-tensor norms are summed in float64, and only when a per-tensor norm
comes out non-finite is that tensor's norm recomputed from a float64 upcast
(``torch.linalg.vector_norm(g, dtype=torch.float64)``). So a finite step costs what ``get_total_norm``
costs, and ``inf``/``NaN`` means a gradient element really is ``inf``/``NaN`` (or the norm exceeds
float64's 1.8e308).

**Shared per step.** :func:`pre_clip_grad_norms` computes the norms of a module's gradients once per
optimizer step and caches them, so :class:`prot_lib.callbacks.NonFiniteGuard`,
:class:`~prot_lib.callbacks.GradNormMonitor` and :class:`~prot_lib.callbacks.AdaptiveGradientClipping`
read the same numbers and the first of them to run (in ``on_before_optimizer_step``, which Lightning
calls before it clips) fixes them as the *pre-clip* norms. Each of those callbacks calls
:func:`forget` in ``on_after_backward``, which Lightning calls after every backward and before any
``on_before_optimizer_step``, so the cache never outlives its step.

Pure torch: works on any ``nn.Module``.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["GradNorms", "grad_norms", "norms_of_grads", "total_grad_norm", "pre_clip_grad_norms", "forget"]


def _per_tensor_norms(grads: Sequence[Tensor]) -> Tensor:
    """(n,) float64 L2 norms of ``grads``, in order; one ``_foreach_norm`` per (device, dtype) group."""
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault((g.device, g.dtype), []).append(i)
    device = grads[0].device
    out = torch.empty(len(grads), dtype=torch.float64, device=device)
    for idx in groups.values():
        norms = torch._foreach_norm([grads[i] for i in idx], 2.0)
        out[torch.tensor(idx, device=device)] = torch.stack([n.to(device) for n in norms]).double()
    return out


@dataclass
class GradNorms:
    """L2 norms of a set of gradients: per tensor and in total, float64.

    Attributes:
        names: parameter names, one per gradient (``model.head.weight``).
        per_tensor: (n,) float64 tensor of per-gradient norms (on the gradients' device).
        total: 0-dim float64 tensor, ``sqrt(sum(per_tensor ** 2))``: the norm of all gradients as one
            vector (what ``clip_grad_norm_`` measures), without float32 overflow.
    """

    names: List[str]
    per_tensor: Tensor
    total: Tensor
    _grads: Sequence[Tensor] = ()
    _exact: bool = False

    def finite(self) -> bool:
        """Is every gradient finite? One host sync. When the fast float32 per-tensor norms say no, the
        non-finite ones are first recomputed from float64 upcasts, so a float32 overflow of a norm alone
        answers True."""
        if bool(torch.isfinite(self.total)):
            return True
        self.make_exact()
        return bool(torch.isfinite(self.total))

    def make_exact(self) -> None:
        """Recompute every non-finite per-tensor norm in float64 (only those; a no-op when all finite)."""
        if self._exact:
            return
        self._exact = True
        bad = (~torch.isfinite(self.per_tensor)).nonzero().flatten().tolist()
        for i in bad:
            self.per_tensor[i] = torch.linalg.vector_norm(self._grads[i], dtype=torch.float64)
        if bad:
            self.total = torch.linalg.vector_norm(self.per_tensor)

    def total_value(self) -> float:
        """The total norm as a Python float (exact: float32 overflows resolved first)."""
        self.finite()
        return float(self.total)

    def as_dict(self) -> Dict[str, float]:
        """``{parameter name: norm}`` as Python floats (one host sync)."""
        self.make_exact()
        return dict(zip(self.names, self.per_tensor.tolist()))

    def largest(self) -> Optional[Tuple[str, float]]:
        """(name, norm) of the largest gradient (a non-finite one first); None without gradients."""
        if not self.names:
            return None
        d = self.as_dict()
        name = max(d, key=lambda k: d[k] if math.isfinite(d[k]) else math.inf)
        return name, d[name]


def norms_of_grads(named_grads) -> GradNorms:
    """:class:`GradNorms` of ``(name, gradient tensor)`` pairs."""
    named = list(named_grads)
    names, grads = [n for n, _ in named], [g.detach() for _, g in named]
    per = _per_tensor_norms(grads)
    return GradNorms(names=names, per_tensor=per, total=torch.linalg.vector_norm(per), _grads=grads)


def grad_norms(named_parameters) -> GradNorms:
    """:class:`GradNorms` of the parameters in ``named_parameters`` (``(name, param)`` pairs) that
    have a gradient. Parameters without one (``p.grad is None``) are left out."""
    return norms_of_grads((name, p.grad) for name, p in named_parameters if p.grad is not None)


def total_grad_norm(parameters) -> Tensor:
    """L2 norm of all gradients of ``parameters`` as one vector: a 0-dim float64 tensor, 0 without
    gradients; ``inf``/``NaN`` only when a gradient element is (float32 overflow of the squares is
    resolved). Same quantity as ``torch.nn.utils.get_total_norm`` / ``clip_grad_norm_``'s return value."""
    g = grad_norms((str(i), p) for i, p in enumerate(parameters))
    g.make_exact()
    return g.total


_CACHE: "weakref.WeakKeyDictionary[nn.Module, GradNorms]" = weakref.WeakKeyDictionary()


def pre_clip_grad_norms(module: nn.Module) -> GradNorms:
    """The norms of ``module``'s gradients for the current optimizer step, computed on first use.

    Call it from ``on_before_optimizer_step`` (after backward, before Lightning clips): the first call
    of a step measures, later calls in the same step read the same object, even after a callback has
    clipped. Pair with :func:`forget` in ``on_after_backward``.
    """
    cached = _CACHE.get(module)
    if cached is None:
        cached = _CACHE[module] = grad_norms(module.named_parameters())
    return cached


def forget(module: nn.Module) -> None:
    """Drop the cached norms of ``module`` (a new backward has run)."""
    _CACHE.pop(module, None)
