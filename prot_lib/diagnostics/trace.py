"""Where was the first non-finite value born? One traced forward (and backward) pass, on demand.

:func:`trace_nonfinite` runs a model once on one batch with a forward hook on every submodule and a
gradient hook on every module output and every parameter, and returns a :class:`TraceReport`: one
row per event, in the order the events happened, with the largest finite magnitude and the number of
non-finite elements of each tensor. Reading it top to bottom answers the questions a NaN loss raises:

- did the data already hold NaN (rows ``input``, ``target``)?
- which module was the first to *output* inf or NaN, and were its inputs still finite (``born``)?
- did the forward pass stay finite and only the loss overflow (a prediction near 1e20 squares to
  more than float32's 3.4e38)?
- which gradient was the first to be non-finite in the backward pass?

How it relates to the usual tools:

- ``torch.autograd.detect_anomaly()`` names the backward *operation* that produced a NaN, with the
  forward traceback, but it checks every operation of every step, which slows the whole run down
  (PyTorch warns to use it for debugging only), and it reports NaN only, not inf, nor where a large
  but finite value grew.
- JAX's ``jax_debug_nans`` re-runs the failing computation op by op once a NaN is seen.
- This tracer is run on demand, for one step: keep the state and batch of the step that failed
  (:class:`prot_lib.diagnostics.NonfiniteSnapshot`, :class:`prot_lib.callbacks.NonFiniteGuard`) and
  trace only that step, at module granularity.

:func:`trace_nonfinite` traces ``loss_fn(model(x), y)``; :func:`trace_step` traces any step
``loss_fn(model, batch)`` (a LightningModule's own ``training_step`` included), and takes *probes*
(:class:`TraceRecorder`): the hook point for quantities inside a module that no hook sees.

Works on any ``nn.Module``; nothing here knows about Mamba.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

#: columns of :attr:`TraceReport.table`
TRACE_COLUMNS = [
    "order", "phase", "kind", "name", "type", "call", "shape", "numel",
    "max_abs_in", "nonfinite_in", "max_abs_out", "nonfinite_out", "params_finite", "born",
]
ROOT_NAME = "<model>"


def _float_tensors(obj: Any) -> List[Tensor]:
    """Every floating-point tensor inside ``obj`` (tensor, tuple, list, dict, nested)."""
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() or obj.is_complex() else []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _float_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _float_tensors(o)]
    return []


def tensor_stats(tensors: Sequence[Tensor]) -> Tuple[float, int, int]:
    """(max |finite element|, number of non-finite elements, number of elements) over ``tensors``.

    The max is NaN when there is no finite element at all (an empty list included).
    """
    max_abs, bad, numel = -1.0, 0, 0
    with torch.no_grad():
        for t in tensors:
            t = t.detach()
            if t.numel() == 0:
                continue
            finite = torch.isfinite(t)
            n_finite = int(finite.sum())
            bad += t.numel() - n_finite
            numel += t.numel()
            if n_finite:
                max_abs = max(max_abs, float(torch.where(finite, t.abs(), torch.zeros_like(t.abs())).max()))
    return (max_abs if max_abs >= 0 else math.nan), bad, numel


def _shape(tensors: Sequence[Tensor]) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors)


@dataclass
class TraceReport:
    """What :func:`trace_nonfinite` found. All magnitudes are of finite elements only.

    Attributes:
        table: one row per event, in execution order (pandas DataFrame, columns :data:`TRACE_COLUMNS`):

            - ``order``: 0, 1, 2, ... across both phases (forward events first);
            - ``phase``: "forward" or "backward";
            - ``kind``: "data" (the batch: rows ``input``, ``target``), "module" (forward: a module's
              output, at the moment the module returned, so a child comes before its parent;
              backward: the gradient of the loss with respect to that module's output), "internal"
              (forward: a quantity inside a module, recorded by a probe, see :class:`TraceRecorder`),
              "loss" (the loss value, its input being the prediction), "parameter" (backward: a
              parameter's gradient, when autograd produced it);
            - ``name``: qualified module or parameter name (``bimamba.layers.0.fwd.in_proj``), the
              root module is ``<model>``;
            - ``type``: the module's class name ("Linear") or "Parameter";
            - ``call``: 0 for a module's first call in this pass, 1 for the second, ...;
            - ``shape``, ``numel``: of the output (forward) or gradient (backward) tensors;
            - ``max_abs_in``, ``nonfinite_in``: largest finite |x| and non-finite count over the
              module's floating-point inputs (forward only; for the loss: prediction and target);
            - ``max_abs_out``, ``nonfinite_out``: the same over its output, or over the gradient;
            - ``params_finite``: the module's own parameters (not its children's) are all finite;
            - ``born``: forward rows whose output holds a non-finite value while every input and own
              parameter is finite: the non-finite value was created right here.

        loss: the loss as a float (None when no loss was computed); may be inf or nan.
        model_name: class name of the traced model.
        backward_ran: whether a backward pass was traced.
    """

    table: pd.DataFrame
    loss: Optional[float] = None
    model_name: str = "model"
    backward_ran: bool = False

    # ------------------------------------------------------------------ queries
    def _rows(self, phase: str, kinds: Iterable[str]) -> pd.DataFrame:
        t = self.table
        return t[(t["phase"] == phase) & t["kind"].isin(list(kinds))]

    def first_row(self, phase: str = "forward", kinds: Iterable[str] = ("module", "internal", "loss"),
                  born_only: bool = False) -> Optional[pd.Series]:
        """The first row (execution order) of ``phase`` and ``kinds`` with a non-finite output.

        ``born_only`` keeps only rows where that value was created (finite inputs).
        Returns the row as a pandas Series, or None.
        """
        rows = self._rows(phase, kinds)
        rows = rows[rows["nonfinite_out"] > 0]
        if born_only:
            rows = rows[rows["born"].fillna(False).astype(bool)]
        return None if rows.empty else rows.iloc[0]

    @property
    def first_forward(self) -> Optional[str]:
        """Name of the first module (or ``"loss"``) whose forward output holds a non-finite value,
        in execution order; None when the forward pass and the loss are finite."""
        row = self.first_row("forward", ("module", "internal", "loss"))
        return None if row is None else row["name"]

    @property
    def born_forward(self) -> Optional[str]:
        """Name of the first module (or ``"loss"``) that turned finite inputs into a non-finite output;
        None when nothing was born in the forward pass (everything finite, or the non-finite values
        came in with the data)."""
        row = self.first_row("forward", ("module", "internal", "loss"), born_only=True)
        return None if row is None else row["name"]

    @property
    def first_backward(self) -> Optional[str]:
        """Name of the first module output or parameter whose gradient holds a non-finite value, in
        the order autograd computed them; None when every gradient is finite or no backward ran."""
        row = self.first_row("backward", ("module", "parameter"))
        return None if row is None else row["name"]

    @property
    def nonfinite_data(self) -> Dict[str, int]:
        """Non-finite element counts of the batch: {"input": n, "target": n} (target only if given)."""
        rows = self._rows("forward", ("data",))
        return {r["name"]: int(r["nonfinite_out"]) for _, r in rows.iterrows()}

    @property
    def prediction_max_abs(self) -> float:
        """Largest finite |prediction| (the root module's output)."""
        rows = self.table[(self.table["phase"] == "forward") & (self.table["name"] == ROOT_NAME)]
        return float(rows["max_abs_out"].iloc[-1]) if len(rows) else math.nan

    def module_scales(self, phase: str = "forward") -> pd.DataFrame:
        """Module rows of ``phase`` with name, type, max_abs_out, nonfinite_out (for plots)."""
        rows = self._rows(phase, ("module",))
        return rows[["order", "name", "type", "call", "max_abs_out", "nonfinite_out"]].reset_index(drop=True)

    # ------------------------------------------------------------------ words
    def __str__(self) -> str:
        lines = [f"trace of {self.model_name}: {int((self.table['phase'] == 'forward').sum())} forward "
                 f"events, {int((self.table['phase'] == 'backward').sum())} backward events"]
        data = {k: v for k, v in self.nonfinite_data.items() if v}
        if data:
            lines.append("data    : non-finite values in the batch: "
                         + ", ".join(f"{k} {v}" for k, v in data.items()))
        row = self.first_row("forward", ("module", "internal"))
        if row is None:
            lines.append(f"forward : every module output finite (max |prediction| "
                         f"{self.prediction_max_abs:.3g})")
        else:
            lines.append(f"forward : first non-finite output at `{row['name']}` ({row['type']}), "
                         f"{int(row['nonfinite_out'])} of {int(row['numel'])} elements; its inputs: "
                         f"max |x| {row['max_abs_in']:.3g}, {int(row['nonfinite_in'])} non-finite")
            born = self.born_forward
            lines.append(f"          born at `{born}`" if born else
                         "          not born in the model: it came in with the data")
        if self.loss is not None:
            where = ""
            if not math.isfinite(self.loss) and self.born_forward == "loss":
                where = " (born in the loss: its inputs are finite)"
            lines.append(f"loss    : {self.loss:.4g}{where}")
        if self.backward_ran:
            brow = self.first_row("backward", ("module", "parameter"))
            if brow is None:
                lines.append("backward: every gradient finite")
            else:
                what = "parameter" if brow["kind"] == "parameter" else "gradient of the output of"
                lines.append(f"backward: first non-finite gradient: {what} `{brow['name']}` "
                             f"({int(brow['nonfinite_out'])} of {int(brow['numel'])} elements)")
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:  # notebooks: the words, not the dataclass repr
        return "```\n" + str(self) + "\n```"


class TraceRecorder:
    """Collects the rows of a trace as they happen (used by :func:`trace_step`; passed to probes).

    A *probe* is the hook point for quantities no module hook can see (issue 9 sec. 3: the inside of
    the S6 scan, a parameter used functionally): a callable ``probe(model, recorder)`` returning a
    context manager that is entered for the traced forward and backward pass. While entered it may
    call :meth:`record_internal` at the moment a quantity is computed, so the row lands in execution
    order between the module rows around it, and the autopsy names it when it is the first non-finite
    value.
    """

    def __init__(self) -> None:
        self.rows: List[Dict[str, Any]] = []
        self.calls: Dict[str, int] = {}
        #: (depth, output tensors) of the outermost module call seen so far: the prediction
        self.top: Tuple[int, List[Tensor]] = (10 ** 9, [])

    def add(self, **row) -> None:
        row["order"] = len(self.rows)
        self.rows.append(row)

    def record_internal(self, name: str, type_name: str, outputs: Sequence[Tensor],
                        inputs: Sequence[Tensor] = (), params_finite: bool = True) -> None:
        """Add a forward row of kind ``"internal"``: a quantity computed inside a module.

        Args:
            name: where, e.g. ``"bimamba.layers.0.fwd:delta"`` (module name, colon, quantity).
            type_name: what, e.g. ``"softplus"``.
            outputs: the quantity's tensors; inputs: the tensors it was computed from (for ``born``).
            params_finite: whether the parameters it used are finite.
        """
        call = self.calls.get(name, 0)
        self.calls[name] = call + 1
        in_max, in_bad, _ = tensor_stats(list(inputs))
        out_max, out_bad, out_n = tensor_stats(list(outputs))
        self.add(phase="forward", kind="internal", name=name, type=type_name, call=call, shape=_shape(outputs),
                 numel=out_n, max_abs_in=in_max, nonfinite_in=in_bad, max_abs_out=out_max, nonfinite_out=out_bad,
                 params_finite=params_finite, born=bool(out_bad > 0 and in_bad == 0 and params_finite))


#: a probe: ``probe(model, recorder) -> context manager`` (see :class:`TraceRecorder`)
Probe = Callable[[nn.Module, TraceRecorder], ContextManager]


def _as_args(x: Union[Tensor, Sequence[Tensor]]) -> tuple:
    if isinstance(x, (tuple, list)):
        return tuple(x)
    return (x,)


def batch_items(batch: Any) -> List[Tuple[str, List[Tensor]]]:
    """Name the parts of a batch for the trace's data rows: a tuple/list ``(x, y, ...)`` gives
    ``input`` (element 0), ``target`` (element 1), ``batch[i]`` (the rest); a dict its keys; a tensor
    ``input``. Only floating-point tensors are listed."""
    if isinstance(batch, (tuple, list)):
        labels = ["input", "target"] + [f"batch[{i}]" for i in range(2, len(batch))]
        items = list(zip(labels, batch))
    elif isinstance(batch, dict):
        items = [(str(k), v) for k, v in batch.items()]
    else:
        items = [("input", batch)]
    return [(label, _float_tensors(v)) for label, v in items if _float_tensors(v)]


def _trace(model: nn.Module, root: nn.Module, compute: Callable[[], Tuple[Optional[Tensor], Optional[List[Tensor]]]],
           data: List[Tuple[str, List[Tensor]]], want_backward: bool, loss_name: str,
           probes: Sequence[Probe] = ()) -> TraceReport:
    """The tracer: hooks on every module of ``root``, data rows, ``compute()`` (returns the loss and,
    when known, the prediction tensors), the loss row, the backward pass; hooks removed afterwards."""
    rec = TraceRecorder()
    names = {id(m): (n or ROOT_NAME) for n, m in root.named_modules()}
    handles = []
    targets = [t for label, ts in data if label == "target" for t in ts]

    def grad_hook(name: str, type_name: str, call: int, kind: str):
        def hook(grad: Tensor) -> None:
            m, bad, n = tensor_stats([grad])
            rec.add(phase="backward", kind=kind, name=name, type=type_name, call=call,
                    shape=str(tuple(grad.shape)), numel=n, max_abs_in=math.nan, nonfinite_in=0,
                    max_abs_out=m, nonfinite_out=bad, params_finite=None, born=None)
        return hook

    def forward_hook(module: nn.Module, args, kwargs, output) -> None:
        name = names.get(id(module), type(module).__name__)
        call = rec.calls.get(name, 0)
        rec.calls[name] = call + 1
        ins = _float_tensors(args) + _float_tensors(kwargs)
        outs = _float_tensors(output)
        in_max, in_bad, _ = tensor_stats(ins)
        out_max, out_bad, out_n = tensor_stats(outs)
        own = list(module.parameters(recurse=False))
        params_ok = all(bool(torch.isfinite(p).all()) for p in own)
        rec.add(phase="forward", kind="module", name=name, type=type(module).__name__, call=call,
                shape=_shape(outs), numel=out_n, max_abs_in=in_max, nonfinite_in=in_bad,
                max_abs_out=out_max, nonfinite_out=out_bad, params_finite=params_ok,
                born=bool(out_bad > 0 and in_bad == 0 and params_ok))
        depth = 0 if name == ROOT_NAME else name.count(".") + 1
        if depth <= rec.top[0]:
            rec.top = (depth, outs)
        if want_backward and torch.is_grad_enabled():
            for t in outs:
                if t.requires_grad:
                    t.register_hook(grad_hook(name, type(module).__name__, call, "module"))

    for module in root.modules():
        handles.append(module.register_forward_hook(forward_hook, with_kwargs=True))
    params = [(n, p) for n, p in root.named_parameters() if p.requires_grad]
    loss_value: Optional[float] = None
    try:
        for label, value in data:
            m, bad, n = tensor_stats(value)
            rec.add(phase="forward", kind="data", name=label, type="Tensor", call=0, shape=_shape(value),
                    numel=n, max_abs_in=math.nan, nonfinite_in=0, max_abs_out=m, nonfinite_out=bad,
                    params_finite=None, born=None)
        with contextlib.ExitStack() as stack:
            for probe in probes:
                stack.enter_context(probe(model, rec))
            if not want_backward:
                with torch.no_grad():
                    compute()
            else:
                with torch.enable_grad():
                    loss, pred = compute()
                    if loss.numel() != 1:
                        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
                    pred = rec.top[1] if pred is None else pred
                    p_max, p_bad, _ = tensor_stats(list(pred) + targets)
                    loss_value = float(loss.detach())
                    bad = 0 if math.isfinite(loss_value) else 1
                    rec.add(phase="forward", kind="loss", name="loss", type=loss_name, call=0, shape="()",
                            numel=1, max_abs_in=p_max, nonfinite_in=p_bad,
                            max_abs_out=abs(loss_value) if bad == 0 else math.nan, nonfinite_out=bad,
                            params_finite=None, born=bool(bad and p_bad == 0))
                    for n, p in params:
                        handles.append(p.register_hook(grad_hook(n, "Parameter", 0, "parameter")))
                    if params and loss.requires_grad:
                        torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    table = pd.DataFrame(rec.rows, columns=TRACE_COLUMNS)
    return TraceReport(table=table, loss=loss_value, model_name=type(root).__name__,
                       backward_ran=bool(want_backward and params))


def trace_nonfinite(model: nn.Module, x: Union[Tensor, Sequence[Tensor]], y: Optional[Tensor] = None,
                    loss_fn: Optional[Callable[..., Tensor]] = None) -> TraceReport:
    """Trace one forward pass (and, with a loss, one backward pass) of ``model`` on one batch.

    Args:
        model: any ``nn.Module``; it runs in its current train/eval mode and is not changed: no
            parameter's ``.grad`` is touched (gradients are taken with ``torch.autograd.grad``).
        x: the model's input, a tensor (called as ``model(x)``) or a tuple/list of positional
            arguments (``model(*x)``), e.g. (batch, L, F) float32 for :class:`S6Regressor`.
        y: target, e.g. (batch,) float32; with it the loss is ``loss_fn(pred, y)``.
        loss_fn: callable returning a scalar tensor: ``loss_fn(pred, y)`` when ``y`` is given, else
            ``loss_fn(pred)``. Default when ``y`` is given: ``F.mse_loss`` (mean). Without ``y`` and
            ``loss_fn`` only the forward pass is traced, under ``torch.no_grad()``.

    Returns:
        :class:`TraceReport`; ``report.first_forward``, ``report.born_forward``,
        ``report.first_backward`` and ``str(report)`` answer "where was it born".

    Raises:
        ValueError: ``loss_fn`` returned a tensor with more than one element.
        Any exception of the model's own forward (hooks are removed first).

    Cost: one forward and one backward pass plus a max/isfinite reduction per module output and
    per gradient, i.e. a few times a normal step; meant for one step, not for every step.
    """
    args = _as_args(x)
    want_backward = y is not None or loss_fn is not None
    fn = loss_fn if loss_fn is not None else (F.mse_loss if y is not None else None)
    data = [("input", _float_tensors(args))] + ([("target", [y])] if y is not None else [])

    def compute():
        pred = model(*args)
        if not want_backward:
            return None, None
        return (fn(pred, y) if y is not None else fn(pred)), _float_tensors(pred)

    return _trace(model, model, compute, data, want_backward, getattr(fn, "__name__", "loss"))


def trace_step(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any,
               root: Optional[str] = None, probes: Sequence[Probe] = ()) -> TraceReport:
    """Trace one training step of any model: ``loss = loss_fn(model, batch)``, then its backward.

    The generic form of :func:`trace_nonfinite` behind the autopsy (:mod:`prot_lib.diagnostics.autopsy`):
    the loss closure may be a LightningModule's own ``training_step`` or any function of the model and
    the batch, so the model needs no particular forward signature.

    Args:
        model: any ``nn.Module`` (a LightningModule included); run in its current mode, its ``.grad``
            untouched.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: what the training step received; its floating-point tensors become the data rows
            (:func:`batch_items`: ``input``, ``target``, ...).
        root: qualified name of the submodule whose modules are hooked and named (default: ``model``
            itself), e.g. ``"model"`` to name modules relative to a LightningModule's ``self.model``.
        probes: :data:`Probe` s entered around the pass (see :class:`TraceRecorder`).

    Returns:
        :class:`TraceReport`. The loss row's inputs are the output of the outermost module call under
        ``root`` (the prediction) and the batch's ``target``.

    Raises:
        ValueError: the loss is not a scalar. Any exception of the step itself (hooks removed first).
    """
    root_module = model.get_submodule(root) if root else model
    return _trace(model, root_module, lambda: (loss_fn(model, batch), None), batch_items(batch), True,
                  getattr(loss_fn, "__name__", "loss"), probes)


def capture_scan(block: nn.Module, hidden_states: Tensor) -> Dict[str, Tensor]:
    """Run one Mamba block and keep the arguments and result of its selective scan.

    The scan is the one part of a Mamba block that is a function, not a module, so forward hooks do
    not see it. This wraps the block's ``_scan`` (the function :class:`prot_lib.models.Mamba` calls)
    for one forward pass, without re-implementing any of the block's math.

    Args:
        block: a :class:`prot_lib.models.Mamba` (anything with a ``_scan(u) -> scan_fn`` method whose
            scan has the ``selective_scan`` contract).
        hidden_states: (batch, L, d_model) input of the block.

    Returns:
        dict of detached float32 tensors: ``u`` (batch, d_inner, L) the scan input (after conv and
        silu), ``delta`` (batch, d_inner, L) the step size AFTER bias and softplus (the paper's Delta),
        ``A`` (d_inner, d_state), ``B``, ``C`` (batch, d_state, L), ``z`` (batch, d_inner, L) the gate
        input, ``deltaA`` (batch, d_inner, L, d_state) = exp(Delta A), ``out`` (batch, d_inner, L)
        the gated scan output y * silu(z), and ``block_out`` (batch, L, d_model).

    Raises:
        AttributeError: ``block`` has no ``_scan`` method.
    """
    if not hasattr(block, "_scan"):
        raise AttributeError(f"{type(block).__name__} has no _scan method; capture_scan needs a Mamba block")
    seen: Dict[str, Tensor] = {}
    original = block._scan

    def recording_scan(u):
        fn = original(u)

        def wrapped(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kw):
            out = fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, **kw)
            d = delta.float() + (delta_bias.float()[..., None] if delta_bias is not None else 0.0)
            d = F.softplus(d) if delta_softplus else d
            seen.update(u=u, delta=d, A=A, B=B, C=C, z=z, out=out)
            seen["deltaA"] = torch.exp(torch.einsum("bdl,dn->bdln", d, A.float()))
            return out
        return wrapped

    block._scan = recording_scan
    try:
        with torch.no_grad():
            seen["block_out"] = block(hidden_states)
    finally:
        del block._scan  # back to the class's method
    return {k: v.detach().float() for k, v in seen.items() if v is not None}
