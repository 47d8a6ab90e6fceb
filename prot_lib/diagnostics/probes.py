"""Probes that watch every module, and every Mamba block's selective scan, while a step runs.

:func:`trace_nonfinite` (``trace.py``) traces one forward/backward pass at module granularity. The two
probes here answer the same question ("where was the first non-finite number born?") in two more
settings, and see one thing module hooks cannot: the selective scan, the one step of a Mamba block that
is a function, not a module (wrapped here as :func:`capture_scan` wraps it, without re-implementing the
block's math):

- :func:`probe_step`: run any closure (a forward pass, a loss) with a hook on every submodule and a
  wrapper around every block's scan, then the backward pass; the events in execution order, the first
  non-finite one, and which parameter gradients are non-finite. Used by
  ``scripts/dyconex_nan_probe.py`` on the first batch of each data variant.
- :class:`StepProbe`: a Lightning callback doing the same at every training step of a run: the first
  module whose output went non-finite (and whether its input was still finite), the order in which
  parameters received non-finite gradients, the size of the weight update (float64). Used by
  ``scripts/nan_birth.py``.

Neither knows about the project's LightningModule: they hook the modules they are given.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["tensor_summary", "watch_events", "first_nonfinite_event", "probe_step", "StepProbe"]


def tensor_summary(t: Any) -> Optional[Dict[str, Any]]:
    """``{"finite", "n_nan", "n_inf", "absmax_finite"}`` of a floating-point tensor (``absmax_finite``:
    largest finite |x|, None when no element is finite); None for anything else or an empty tensor."""
    if not torch.is_tensor(t) or not t.is_floating_point() or t.numel() == 0:
        return None
    t = t.detach()
    finite = torch.isfinite(t)
    return {"finite": bool(finite.all()), "n_nan": int(torch.isnan(t).sum()), "n_inf": int(torch.isinf(t).sum()),
            "absmax_finite": float(t[finite].abs().max()) if finite.any() else None}


def _bad(summary: Optional[Dict[str, Any]]) -> bool:
    return summary is not None and not summary["finite"]


@contextlib.contextmanager
def watch_events(model: nn.Module, events: List[Dict[str, Any]], grad_only: bool = False) -> Iterator[None]:
    """Append one event per submodule call and per selective-scan call of ``model`` to ``events``, in
    execution order, while the block runs.

    A module event: ``{"module": qualified name, "kind": class name, "input": tensor_summary of its first
    input, "output": tensor_summary of its output}`` (recorded when the module returns, so children come
    before their parent). A scan event (every module with a ``_scan`` method, i.e. a
    :class:`prot_lib.models.Mamba` block): ``{"module": "<block>.selective_scan", "kind": "scan",
    "input": {"u", "delta_softplus", "B", "C", "z"} summaries, "output": summary of y}``; u (batch,
    d_inner, L), delta after bias and softplus (batch, d_inner, L), B, C (batch, d_state, L).

    Args:
        model: any module; the root itself is not hooked (its children are).
        events: the list to append to.
        grad_only: record only calls made with autograd on (a training step's forward, not a
            validation pass).
    """
    handles = []
    patched = []

    def on(name: str):
        def hook(mod, inp, out):
            if grad_only and not torch.is_grad_enabled():
                return
            events.append({"module": name, "kind": type(mod).__name__,
                           "input": tensor_summary(inp[0]) if inp else None, "output": tensor_summary(out)})
        return hook

    def scan_wrapper(block: nn.Module, name: str):
        original = block._scan

        def recording_scan(u):
            fn = original(u)

            def wrapped(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kw):
                out = fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, **kw)
                if not grad_only or torch.is_grad_enabled():
                    d = delta.float() + (delta_bias.float()[..., None] if delta_bias is not None else 0.0)
                    d = F.softplus(d) if delta_softplus else d
                    events.append({"module": f"{name}.selective_scan", "kind": "scan",
                                   "input": {"u": tensor_summary(u), "delta_softplus": tensor_summary(d),
                                             "B": tensor_summary(B), "C": tensor_summary(C),
                                             "z": tensor_summary(z)},
                                   "output": tensor_summary(out)})
                return out
            return wrapped
        return recording_scan

    try:
        for name, mod in model.named_modules():
            if not name or isinstance(mod, nn.Identity):
                continue
            handles.append(mod.register_forward_hook(on(name)))
            if callable(getattr(mod, "_scan", None)):
                mod._scan = scan_wrapper(mod, name)  # an instance attribute shadows the class's method
                patched.append(mod)
        yield
    finally:
        for h in handles:
            h.remove()
        for mod in patched:
            del mod._scan  # back to the class's method


def first_nonfinite_event(events: List[Dict[str, Any]], outputs_only: bool = False) -> Optional[Dict[str, Any]]:
    """The first event (execution order) with a non-finite input or output (``outputs_only``: output),
    with ``non_finite`` ("input" or "output") and ``born_here`` (its output is non-finite while every
    input was finite: the value was created right there); None when every event is finite."""
    for e in events:
        ins = e["input"]
        in_bad = any(_bad(v) for v in ins.values()) if isinstance(ins, dict) and "finite" not in ins else _bad(ins)
        out_bad = _bad(e["output"])
        if out_bad or (in_bad and not outputs_only):
            return {**e, "non_finite": "input" if in_bad else "output", "born_here": out_bad and not in_bad}
    return None


def probe_step(model: nn.Module, run: Callable[[], Any], backward: bool = True) -> Dict[str, Any]:
    """Run ``run()`` with every submodule and scan of ``model`` watched, then back-propagate its loss.

    Args:
        model: the network to watch (e.g. ``S6Regressor``).
        run: a closure doing one forward pass and returning the loss (a scalar tensor, or a tuple whose
            first element is it), e.g. ``lambda: F.mse_loss(model(x), y)``.
        backward: call ``loss.backward()`` (gradients land in ``.grad``, as in a training step).

    Returns:
        dict: ``first_nonfinite`` (:func:`first_nonfinite_event`), ``events`` (:func:`watch_events`),
        ``loss`` (float), ``per_module_output_absmax`` and ``per_module_output_finite`` (by event name),
        ``n_params_nonfinite_grad`` and ``first_param_nonfinite_grad`` (in ``named_parameters`` order;
        None without a backward pass or when every gradient is finite).
    """
    events: List[Dict[str, Any]] = []
    with watch_events(model, events):
        out = run()
    loss = out[0] if isinstance(out, (tuple, list)) else out
    bad_grads: List[str] = []
    if backward and torch.is_tensor(loss) and loss.requires_grad:
        loss.backward()
        bad_grads = [n for n, p in model.named_parameters() if _bad(tensor_summary(p.grad))]
    return {
        "first_nonfinite": first_nonfinite_event(events), "events": events,
        "loss": float(loss.detach()) if torch.is_tensor(loss) else math.nan,
        "per_module_output_absmax": {e["module"]: (e["output"] or {}).get("absmax_finite") for e in events},
        "per_module_output_finite": {e["module"]: (e["output"] or {}).get("finite") for e in events},
        "n_params_nonfinite_grad": len(bad_grads), "first_param_nonfinite_grad": bad_grads[0] if bad_grads else None,
    }


class StepProbe(pl.Callback):
    """Per training step, where the first non-finite number appeared (any LightningModule).

    Rows (:attr:`rows`, one per training batch): ``step`` (``global_step`` before the step), ``loss``
    (what ``training_step`` returned), ``fwd_first`` (the first submodule, or scan, whose output held a
    non-finite value in this step's forward pass; None if none), ``fwd_first_input_finite`` and
    ``fwd_first_input_absmax`` (its input: still finite? then the value was born there),
    ``output_absmax`` ({name: largest finite |output|} of the modules in ``watch``, default the
    LightningModule's direct children, i.e. the prediction of a module wrapping one network),
    ``bwd_nonfinite_order`` (parameters whose gradient went non-finite, in the order autograd produced
    them: nearest the loss first), ``params_absmax`` (largest |weight| before the step),
    ``update_norm`` (``||theta_after - theta_before||``, in float64) and ``params_finite_after``.
    """

    def __init__(self, watch: Optional[List[str]] = None) -> None:
        self.rows: List[Dict[str, Any]] = []
        self.watch = watch
        self._events: List[Dict[str, Any]] = []
        self._stack: Optional[contextlib.ExitStack] = None
        self._cur: Optional[Dict[str, Any]] = None
        self._before: List[torch.Tensor] = []
        self._grad_handles: list = []

    def setup(self, trainer, pl_module, stage=None):
        if self.watch is None:
            self.watch = [n for n, _ in pl_module.named_children()]
        for name, p in pl_module.named_parameters():
            def grad_hook(g, _name=name):
                if self._cur is not None and _bad(tensor_summary(g)):
                    self._cur["bwd_nonfinite_order"].append(_name)
                return g
            self._grad_handles.append(p.register_hook(grad_hook))

    def teardown(self, trainer, pl_module, stage=None):
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._stack is not None:  # the previous batch never reached on_train_batch_end
            self._stack.close()
        self._events = []
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(watch_events(pl_module, self._events, grad_only=True))
        params = list(pl_module.parameters())
        self._before = [p.detach().clone() for p in params]
        self._cur = {"step": trainer.global_step, "bwd_nonfinite_order": [],
                     "params_absmax": max(float(p.detach().abs().max()) for p in params)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._stack.close()
        first = first_nonfinite_event(self._events, outputs_only=True)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        params = list(pl_module.parameters())
        update = math.sqrt(sum(float(((p.detach().double() - b.double()) ** 2).sum()) for p, b in zip(params, self._before)))
        absmax = {}
        for e in self._events:
            if e["module"] in self.watch and e["output"] is not None:
                absmax[e["module"]] = e["output"]["absmax_finite"] if e["output"]["finite"] else math.inf
        self._cur.update(
            loss=float(loss.detach()) if torch.is_tensor(loss) else None,
            fwd_first=first["module"] if first else None,
            fwd_first_input_finite=(not _bad(first["input"]) if first["kind"] != "scan" else
                                    not any(_bad(v) for v in first["input"].values())) if first else None,
            fwd_first_input_absmax=(first["input"] or {}).get("absmax_finite") if first and first["kind"] != "scan" else None,
            output_absmax=absmax, update_norm=update,
            params_finite_after=all(bool(torch.isfinite(p).all()) for p in params))
        self.rows.append(self._cur)
        self._cur, self._stack, self._before = None, None, []
