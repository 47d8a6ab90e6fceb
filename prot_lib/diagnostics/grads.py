"""Gradient norms that do not overflow, measured once per optimizer step and shared.

**Why float64.** ``torch.nn.utils.get_total_norm`` and ``clip_grad_norm_`` reduce in the gradients' dtype:
in float32 the squares overflow once a norm exceeds ~1.8e19 (sqrt of float32's max 3.4e38), so the
total norm is ``inf`` while every gradient element is finite
(``get_total_norm([torch.full((10,), 1e19)])`` is inf; the true norm is 3.2e19). Counting such a step as
"non-finite gradient" misplaces the failure (the loss is finite, the weights stay finite). Here a norm
that comes out non-finite in float32 is recomputed in float64 (``torch.linalg.vector_norm(...,
dtype=torch.float64)``, ``torch._foreach_norm(..., dtype=torch.float64)``): a float32 value squares to
at most 1.2e77, far below float64's 1.8e308, so ``inf``/``NaN`` then means a gradient element really is
``inf``/``NaN``.

**Cost.** One reduction for the total: on CPU, for up to :data:`CAT_MAX_NUMEL` gradient elements, one
float32 ``vector_norm`` over the concatenated gradients (a CPU ``_foreach_norm`` is a loop of one kernel
per tensor, slower for the many small tensors of a small model), redone in float64 only when it is not
finite; otherwise (GPU, or larger models) one fused ``_foreach_norm`` accumulating in float64 and a norm
of the per-tensor norms. Per-parameter norms are computed only when asked for
(:meth:`GradNorms.as_dict`). ``benchmarks/bench_guards.py`` measures the step cost.

**Shared per step.** :func:`pre_clip_grad_norms` measures a module's gradients once per optimizer step
and caches the result, so :class:`prot_lib.callbacks.NonFiniteGuard`,
:class:`~prot_lib.callbacks.GradNormMonitor` and :class:`~prot_lib.callbacks.AdaptiveGradientClipping`
read the same numbers, and the first of them to run (in ``on_before_optimizer_step``, which Lightning
calls before it clips) fixes them as the *pre-clip* norms. Each of those callbacks calls :func:`forget`
in ``on_after_backward``, which Lightning calls after every backward and before any
``on_before_optimizer_step``, so the cache never outlives its step, and again in ``on_train_batch_end``,
so it holds no gradient past the step (they are freed by the next ``zero_grad``, as without it). The list of a module's parameters is
kept between steps too (:func:`track` refreshes it; the callbacks call it in ``on_fit_start``).

Pure torch: works on any ``nn.Module``.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["GradNorms", "grad_norms", "norms_of_grads", "total_grad_norm", "pre_clip_grad_norms", "forget",
           "track", "CAT_MAX_NUMEL"]

#: on CPU, gradients with at most this many elements in all are concatenated for one norm kernel
CAT_MAX_NUMEL = 1 << 22


def _total64(grads: Sequence[Tensor], numel: Optional[int] = None) -> Tensor:
    """0-dim float64 L2 norm of all ``grads`` as one vector."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    device = grads[0].device
    if device.type == "cpu" and (numel if numel is not None else sum(g.numel() for g in grads)) <= CAT_MAX_NUMEL:
        flat = torch.cat([g.reshape(-1) for g in grads])
        if flat.dtype == torch.float64:
            return torch.linalg.vector_norm(flat)
        # float32 first (no upcast copy); only a non-finite result, i.e. an overflow or a real inf/NaN,
        # is recomputed in float64. One host sync either way (the caller reads the value anyway).
        n = torch.linalg.vector_norm(flat)
        return n.double() if math.isfinite(float(n)) else torch.linalg.vector_norm(flat, dtype=torch.float64)
    norms = torch._foreach_norm(list(grads), 2.0, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


@dataclass
class GradNorms:
    """L2 norms of a set of gradients, free of float32 overflow.

    Attributes:
        names: parameter names, one per gradient (``model.head.weight``).
        total: 0-dim float64 tensor: the norm of all gradients as one vector (what ``clip_grad_norm_``
            measures), without float32 overflow; ``inf``/``NaN`` iff some gradient element is (or the
            norm exceeds float64's range, 1.8e308).
    """

    names: List[str]
    total: Tensor
    _grads: Sequence[Tensor] = ()
    _per_tensor: Optional[Tensor] = field(default=None, repr=False)
    _value: Optional[float] = field(default=None, repr=False)

    def finite(self) -> bool:
        """Is every gradient finite? (One host sync, shared with :meth:`total_value`.)"""
        return math.isfinite(self.total_value())

    def total_value(self) -> float:
        """The total norm as a Python float (read from the tensor once)."""
        if self._value is None:
            self._value = float(self.total)
        return self._value

    @property
    def per_tensor(self) -> Tensor:
        """(n,) float64 norms of the gradients, in :attr:`names` order, computed on first use: from the
        gradients as they are then (:func:`track` with ``per_tensor=True`` takes them before clipping)."""
        if self._per_tensor is None:
            if not self._grads:
                self._per_tensor = torch.zeros(0, dtype=torch.float64)
            else:
                norms = torch._foreach_norm(list(self._grads), 2.0, dtype=torch.float64)
                self._per_tensor = torch.stack([n.to(self._grads[0].device) for n in norms])
        return self._per_tensor

    def as_dict(self) -> Dict[str, float]:
        """``{parameter name: norm}`` as Python floats (one host sync)."""
        return dict(zip(self.names, self.per_tensor.tolist()))

    def largest(self) -> Optional[Tuple[str, float]]:
        """(name, norm) of the largest gradient (a non-finite one first); None without gradients."""
        if not self.names:
            return None
        d = self.as_dict()
        name = max(d, key=lambda k: d[k] if math.isfinite(d[k]) else math.inf)
        return name, d[name]


def norms_of_grads(named_grads, numel: Optional[int] = None) -> GradNorms:
    """:class:`GradNorms` of ``(name, gradient tensor)`` pairs."""
    named = list(named_grads)
    grads = [g.detach() for _, g in named]
    return GradNorms(names=[n for n, _ in named], total=_total64(grads, numel), _grads=grads)


def grad_norms(named_parameters) -> GradNorms:
    """:class:`GradNorms` of the parameters in ``named_parameters`` (``(name, param)`` pairs) that
    have a gradient. Parameters without one (``p.grad is None``) are left out."""
    return norms_of_grads((name, p.grad) for name, p in named_parameters if p.grad is not None)


def total_grad_norm(parameters) -> Tensor:
    """L2 norm of all gradients of ``parameters`` as one vector: a 0-dim float64 tensor, 0 without
    gradients; ``inf``/``NaN`` only when a gradient element is (no float32 overflow of the squares).
    Same quantity as ``torch.nn.utils.get_total_norm`` / ``clip_grad_norm_``'s return value."""
    return _total64([p.grad.detach() for p in parameters if p.grad is not None])


_PARAMS: "weakref.WeakKeyDictionary[nn.Module, Tuple[List[str], List[nn.Parameter], int]]" = \
    weakref.WeakKeyDictionary()
_CACHE: "weakref.WeakKeyDictionary[nn.Module, GradNorms]" = weakref.WeakKeyDictionary()
_PER_TENSOR: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def track(module: nn.Module, per_tensor: bool = False) -> None:
    """(Re)read the list of ``module``'s parameters that :func:`pre_clip_grad_norms` measures.
    Parameters added to the module after the last call are not measured until it is called again.

    ``per_tensor=True`` (sticky: later calls without it keep it) makes every step's measurement also
    take the per-parameter norms at once, before anything can clip the gradients in place."""
    named = list(module.named_parameters())
    _PARAMS[module] = ([n for n, _ in named], [p for _, p in named], sum(p.numel() for _, p in named))
    if per_tensor:
        _PER_TENSOR.add(module)


def pre_clip_grad_norms(module: nn.Module) -> GradNorms:
    """The norms of ``module``'s gradients for the current optimizer step, computed on first use.

    Call it from ``on_before_optimizer_step`` (after backward, before Lightning clips): the first call
    of a step measures, later calls in the same step read the same object, even after a callback has
    clipped. Pair with :func:`forget` in ``on_after_backward``. Gradients are used as they are (no copy,
    no ``detach``: a ``.grad`` carries no graph unless backward ran with ``create_graph=True``).
    """
    cached = _CACHE.get(module)
    if cached is None:
        if module not in _PARAMS:
            track(module)
        names, params, numel = _PARAMS[module]
        grads = [p.grad for p in params]
        if any(g is None for g in grads):  # frozen or unused parameters: leave them out
            names = [n for n, g in zip(names, grads) if g is not None]
            grads = [g for g in grads if g is not None]
            numel = None
        cached = _CACHE[module] = GradNorms(names=names, total=_total64(grads, numel), _grads=grads)
        if module in _PER_TENSOR:
            cached.per_tensor  # noqa: B018 - measured now: later callbacks may clip in place
    return cached


def forget(module: nn.Module) -> None:
    """Drop the cached norms of ``module`` (a new backward has run)."""
    _CACHE.pop(module, None)
