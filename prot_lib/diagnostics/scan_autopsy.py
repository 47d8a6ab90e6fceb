"""Inside the S6 scan: the first non-finite quantity of one Mamba block, its step t and its indices.

Module hooks (:func:`prot_lib.diagnostics.trace_step`) see a Mamba block's ``in_proj``, ``conv1d``,
``x_proj`` and ``out_proj``, but not the selective scan between them: the scan is a function, and
``A_log``, ``D`` and ``dt_proj`` are used functionally, so a NaN born there is first seen as
"``out_proj`` received non-finite inputs". :func:`scan_autopsy` runs the block once on its input,
keeps the scan's arguments (:func:`prot_lib.diagnostics.capture_scan`, without re-implementing the
block), and recomputes the scan in float32 step by step, in the order of mamba-ssm's
``mamba_ssm.ops.selective_scan_interface.selective_scan_ref`` (Gu & Dao 2023, "Mamba", eq. 2a/2b and
Algorithm 2), per batch element b, channel d (d_inner) and state n (d_state)::

    A        = -exp(A_log)                                  (d_inner, d_state), parameter
    delta_t  = softplus(delta_raw_t + dt_proj.bias)         the step size Delta, dimensionless
    dA_t     = exp(delta_t * A)                             decay in (0, 1]            (eq. 4, ZOH)
    dBu_t    = (delta_t * B_t) * u_t                        the input's kick            (eq. 4)
    h_t      = dA_t * h_{t-1} + dBu_t,   h_0 = 0            the state                   (eq. 2a)
    y_t      = sum_n C_{t,n} h_{t,n}                        the readout                 (eq. 2b)
    out_t    = (y_t + D * u_t) * silu(z_t)                  D skip and gate (mamba-ssm's contract)

Where to look, in this order (the first non-finite one is the finding):

1. the parameters the block uses functionally: ``A_log`` (and A = -exp(A_log), which overflows to
   -inf for A_log > 88.7), ``D``, ``dt_proj.bias``, ``dt_proj.weight``: a non-finite one is the birth
   place (kind ``"parameter"``);
2. the block's input (kind ``"input"``: not born in this block);
3. step by step, t = 0, 1, ..., L-1: the scan's inputs u_t, B_t, C_t, z_t (kind ``"input"``: computed
   before the scan, by ``in_proj``/``conv1d``/``x_proj``, whose rows the trace already has), then
   delta_t, dA_t, dBu_t, h_t, y_t, D*u_t, y_t + D*u_t, silu(z_t), out_t (kind ``"scan"``).

Why step by step, not quantity by quantity (the reference computes dA and dBu for every t before its
loop): the scan is causal, so the first step at which anything is non-finite is the first step at
which the scan's output is (the independent check in ``tests/test_scan_autopsy.py``), and within that
step the order above is the order of the recurrence. The loop stops at that step.

Cost: one forward of the block (to capture the scan's arguments, including the (batch, d_inner, L,
d_state) tensor exp(delta A) that :func:`capture_scan` keeps) plus the loop up to the failing step,
one (batch, d_inner, d_state) update per step; run only on a failing step's replay
(:func:`prot_lib.diagnostics.autopsy`), never during training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.mamba import Mamba
from .trace import capture_scan

#: the quantities :func:`scan_autopsy` can name, in its order of checking
QUANTITIES = ("A_log", "A", "D", "dt_proj.bias", "dt_proj.weight", "input", "u", "B", "C", "z",
              "delta", "exp(delta*A)", "delta*B*u", "h", "y", "D*u", "y+D*u", "silu(z)", "out")
#: what each index of a quantity is called, in the order of its tensor's dimensions (t listed apart)
INDEX_NAMES: Dict[str, Tuple[str, ...]] = {
    "A_log": ("channel", "state"), "A": ("channel", "state"), "D": ("channel",),
    "dt_proj.bias": ("channel",), "dt_proj.weight": ("channel", "rank"), "input": ("batch", "feature"),
    "u": ("batch", "channel"), "B": ("batch", "state"), "C": ("batch", "state"), "z": ("batch", "channel"),
    "delta": ("batch", "channel"), "exp(delta*A)": ("batch", "channel", "state"),
    "delta*B*u": ("batch", "channel", "state"), "h": ("batch", "channel", "state"), "y": ("batch", "channel"),
    "D*u": ("batch", "channel"), "y+D*u": ("batch", "channel"), "silu(z)": ("batch", "channel"),
    "out": ("batch", "channel"),
}
_DESCRIBE = {
    "A_log": "parameter A_log", "A": "A = -exp(A_log)", "D": "parameter D (the skip)",
    "dt_proj.bias": "parameter dt_proj.bias (added to delta before softplus)",
    "dt_proj.weight": "parameter dt_proj.weight (delta's low-rank projection)", "input": "the block's input",
    "u": "the scan's input u (after in_proj, conv1d, silu)", "B": "the scan's input B (from x_proj)",
    "C": "the scan's input C (from x_proj)", "z": "the gate input z (from in_proj)",
    "delta": "delta after bias and softplus", "exp(delta*A)": "exp(delta*A)", "delta*B*u": "delta*B*u",
    "h": "h_t", "y": "y_t = C_t h_t", "D*u": "the D skip D*u", "y+D*u": "y + D*u",
    "silu(z)": "the gate silu(z)", "out": "the gated output (y + D*u) * silu(z)",
}


def _first_bad(x: Tensor) -> Optional[Tuple[int, ...]]:
    """Index (row-major) of the first non-finite element of ``x``, or None when all are finite."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return None
    return tuple(int(i) for i in bad.nonzero()[0])


def _nanmax(*values: float) -> float:
    """max of the values that are not NaN (NaN when all are)."""
    vals = [v for v in values if not math.isnan(v)]
    return max(vals) if vals else math.nan


def _max_finite(x: Tensor) -> float:
    """Largest finite |x| (NaN when no element is finite)."""
    x = x.detach().abs()
    fin = torch.isfinite(x)
    return float(x[fin].max()) if bool(fin.any()) else math.nan


@dataclass
class ScanAutopsy:
    """What :func:`scan_autopsy` found in one Mamba block.

    Attributes:
        block: the block's name (as the caller gave it, e.g. ``"bimamba.forward_layers.3"``).
        quantity: the first non-finite quantity (one of :data:`QUANTITIES`), None when everything the
            block computes up to its scan's output is finite.
        kind: ``"parameter"`` (a functionally used parameter is non-finite: the birth place),
            ``"input"`` (the block's input, or an argument of the scan computed by a module before it:
            born upstream of the scan), ``"scan"`` (born inside the scan from finite inputs and
            parameters), None when nothing was found.
        t: the step (token index along L, 0-based) where it happened; None for parameters.
        index: the rest of its index by name (:data:`INDEX_NAMES`): ``batch``, ``channel`` (0..d_inner-1),
            ``state`` (0..d_state-1), ``feature`` (0..d_model-1) or ``rank``.
        value: the non-finite value there (inf, -inf or nan).
        context: max |finite| of the quantities that fed it (e.g. ``max|delta| t<=37``,
            ``max|delta*B*u| t<=37``, ``max|h_{t-1}|``); the exact keys depend on the quantity.
        shape: ``{"batch", "L", "d_inner", "d_state"}`` of the scan.
        steps: how many steps the loop ran (t + 1 when it stopped at a finding, L otherwise).
        block_out_finite: whether the block's own output (the real forward, through ``out_proj``) was
            finite on this input.
    """

    block: str
    quantity: Optional[str]
    kind: Optional[str]
    t: Optional[int] = None
    index: Dict[str, int] = field(default_factory=dict)
    value: float = math.nan
    context: Dict[str, float] = field(default_factory=dict)
    shape: Dict[str, int] = field(default_factory=dict)
    steps: int = 0
    block_out_finite: bool = True

    @property
    def found(self) -> bool:
        """True when a non-finite quantity was found."""
        return self.quantity is not None

    @property
    def born_inside(self) -> bool:
        """True when the non-finite value was born in this block's scan or in a parameter it uses
        functionally, i.e. where no module hook can see it."""
        return self.kind in ("parameter", "scan")

    def where(self) -> str:
        """``"t=37 (batch 4, channel 113, state 0)"`` or ``"channel 5"`` for a parameter."""
        idx = ", ".join(f"{k} {v}" for k, v in self.index.items())
        return idx if self.t is None else f"t={self.t} ({idx})"

    def sentence(self) -> str:
        """One sentence on the finding, e.g. "born inside `fwd.3`'s scan: h_t at t=37 (batch 4,
        channel 113, state 0) overflowed to inf; inputs finite: max|delta| t<=37 9.1, ..."."""
        if not self.found:
            return (f"the scan of `{self.block}` recomputed in float32 is finite on this input: the "
                    f"non-finite value is not born inside it")
        what = _DESCRIBE[self.quantity]
        ctx = ", ".join(f"{k} {v:.3g}" for k, v in self.context.items())
        if self.kind == "parameter":
            still = ("; the block's output is still finite on this input (it shows in the gradients)"
                     if self.block_out_finite else "")
            return (f"born in `{self.block}`'s {what}, used functionally by the scan (no module hook sees it): "
                    f"{self.value} at {self.where()}" + (f"; {ctx}" if ctx else "") + still)
        if self.kind == "input":
            return (f"not born in `{self.block}`'s scan: {what} is already non-finite at {self.where()} "
                    f"({self.value})")
        verb = "overflowed to" if math.isinf(self.value) else "became"
        return (f"born inside `{self.block}`'s scan: {what} at {self.where()} {verb} {self.value}"
                + (f"; inputs finite: {ctx}" if ctx else ""))

    def summary(self) -> Dict[str, Any]:
        """JSON-ready dict of the finding (non-finite floats as strings)."""
        def js(v: float):
            return v if math.isfinite(v) else str(v)
        return {"block": self.block, "quantity": self.quantity, "kind": self.kind, "t": self.t,
                "index": dict(self.index), "value": None if not self.found else js(self.value),
                "context": {k: js(v) for k, v in self.context.items()}, "shape": dict(self.shape),
                "steps": self.steps, "block_out_finite": self.block_out_finite, "sentence": self.sentence()}

    def __str__(self) -> str:
        return f"scan autopsy of `{self.block}`: {self.sentence()}"


def _param_finding(block: nn.Module, name: str) -> Optional[ScanAutopsy]:
    """A non-finite functionally used parameter (A_log, A = -exp(A_log), D, dt_proj.bias/weight)."""
    checks: List[Tuple[str, Tensor]] = [("A_log", block.A_log.detach().float())]
    checks.append(("A", -torch.exp(checks[0][1])))
    checks += [("D", block.D.detach().float()), ("dt_proj.bias", block.dt_proj.bias.detach().float()),
               ("dt_proj.weight", block.dt_proj.weight.detach().float())]
    for quantity, value in checks:
        idx = _first_bad(value)
        if idx is not None:
            ctx = {"A_log there": float(checks[0][1][idx])} if quantity == "A" else {}
            return ScanAutopsy(block=name, quantity=quantity, kind="parameter",
                               index=dict(zip(INDEX_NAMES[quantity], idx)), value=float(value[idx]), context=ctx)
    return None


def _first_bad_in_time(x: Tensor, time_dim: int) -> Optional[Tuple[int, Tuple[int, ...]]]:
    """``(t, rest of the index)`` of the first non-finite element of ``x`` ordered by time first."""
    idx = _first_bad(x.movedim(time_dim, 0))
    return None if idx is None else (idx[0], idx[1:])


def scan_autopsy(block: nn.Module, hidden_states: Tensor, name: str = "block") -> ScanAutopsy:
    """Find the first non-finite quantity inside one Mamba block's selective scan, with its step and indices.

    Args:
        block: a :class:`prot_lib.models.Mamba` (its parameters ``A_log`` (d_inner, d_state), ``D``
            (d_inner,), ``dt_proj.bias`` (d_inner,), ``dt_proj.weight`` (d_inner, dt_rank) are read; its
            scan's arguments come from :func:`prot_lib.diagnostics.capture_scan`).
        hidden_states: (batch, L, d_model) float32, the block's input (as a forward pre-hook sees it).
        name: how the block is called in the result (its qualified module name).

    Returns:
        :class:`ScanAutopsy`: the quantity, kind, t, (batch, channel[, state]) and the magnitudes that fed it;
        ``quantity=None`` when the whole scan is finite. The order of checking is the module docstring's:
        functional parameters, the block's input, then step by step u, B, C, z, delta, exp(delta*A),
        delta*B*u, h_t, y_t, D*u, y+D*u, silu(z), out. The recurrence is recomputed in float32 one step
        at a time, as ``selective_scan_ref``'s loop runs it (h = exp(delta A) h + delta B u, y = C h),
        with delta*B*u formed as (delta*B)*u, the order :mod:`prot_lib.models.numba_scan` documents for
        its kernels, so that it is non-finite where the block's own scan is
        (``tests/test_scan_autopsy.py`` checks the pattern against it).

    Raises:
        TypeError: ``block`` is not a :class:`prot_lib.models.Mamba`.
        ValueError: ``hidden_states`` is not (batch, L, d_model).

    The block and its parameters are not changed; the global RNG is not used (a Mamba block has no dropout).
    """
    if not isinstance(block, Mamba):
        raise TypeError(f"scan_autopsy needs a prot_lib.models.Mamba block, got {type(block).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != block.d_model:
        raise ValueError(f"hidden_states must be (batch, L, d_model={block.d_model}), got {tuple(hidden_states.shape)}")
    x = hidden_states.detach()
    param = _param_finding(block, name)
    cap = capture_scan(block, x)
    block_out_finite = bool(torch.isfinite(cap["block_out"]).all())
    u, delta, A, B, C = cap["u"], cap["delta"], cap["A"], cap["B"], cap["C"]
    z = cap.get("z")
    D = block.D.detach().float()
    batch, d_inner, L = u.shape
    shape = {"batch": batch, "L": L, "d_inner": d_inner, "d_state": A.shape[1]}

    def finding(quantity: str, kind: str, t: Optional[int], idx: Sequence[int], value: Tensor,
                context: Optional[Dict[str, float]] = None, steps: int = 0) -> ScanAutopsy:
        return ScanAutopsy(block=name, quantity=quantity, kind=kind, t=t, index=dict(zip(INDEX_NAMES[quantity], idx)),
                           value=float(value), context=context or {}, shape=shape, steps=steps,
                           block_out_finite=block_out_finite)

    if param is not None:
        param.shape, param.block_out_finite = shape, block_out_finite
        return param
    bad_in = _first_bad_in_time(x.float(), 1)  # (batch, L, d_model): time is dim 1
    if bad_in is not None:
        t, (b, f) = bad_in
        return finding("input", "input", t, (b, f), x[b, t, f])

    # Per-step arguments of the scan: the first non-finite step of each (time is their last dim).
    per_step = {q: _first_bad_in_time(v, 2) for q, v in (("u", u), ("B", B), ("C", C), ("delta", delta))}
    if z is not None:
        per_step["z"] = _first_bad_in_time(z, 2)
    first_t = min([hit[0] for hit in per_step.values() if hit is not None], default=L)

    h = A.new_zeros((batch, d_inner, A.shape[1]))
    max_dbu = torch.zeros((), dtype=torch.float32)
    for t in range(L):
        if t == first_t:  # an argument of the scan is non-finite here: u, B, C, z (upstream), delta (its own math)
            for q in ("u", "B", "C", "z", "delta"):
                hit = per_step.get(q)
                if hit is not None and hit[0] == t:
                    src = {"u": u, "B": B, "C": C, "z": z, "delta": delta}[q]
                    ctx = {}
                    if q == "delta":
                        ctx = {f"max|u| t<={t}": _max_finite(u[:, :, :t + 1]),
                               "max|dt_proj.bias|": _max_finite(block.dt_proj.bias.detach()),
                               "max|dt_proj.weight|": _max_finite(block.dt_proj.weight.detach())}
                    return finding(q, "scan" if q == "delta" else "input", t, hit[1], src[hit[1][0], hit[1][1], t],
                                   ctx, t + 1)
        d_t = delta[:, :, t]  # (batch, d_inner)
        dA = torch.exp(d_t[..., None] * A)  # (batch, d_inner, d_state), in (0, 1] for finite delta >= 0
        dBu = (d_t[..., None] * B[:, None, :, t]) * u[:, :, t, None]  # (delta*B) then *u, as the reference
        h_prev = h
        h = dA * h_prev + dBu
        y = (h * C[:, None, :, t]).sum(-1)  # (batch, d_inner)
        Du = u[:, :, t] * D
        yD = y + Du
        g = F.silu(z[:, :, t]) if z is not None else None
        out = yD * g if g is not None else yD
        steps = [("exp(delta*A)", dA), ("delta*B*u", dBu), ("h", h), ("y", y), ("D*u", Du), ("y+D*u", yD)]
        if g is not None:
            steps += [("silu(z)", g), ("out", out)]
        if bool(torch.isfinite(out).all()) and bool(torch.isfinite(h).all()):
            max_dbu = torch.maximum(max_dbu, dBu.abs().amax())
            continue
        for q, v in steps:
            idx = _first_bad(v)
            if idx is None:
                continue
            b, c = idx[0], idx[1]
            ctx = {f"max|delta| t<={t}": _max_finite(delta[:, :, :t + 1]),
                   f"max|delta*B*u| t<={t}": _nanmax(float(max_dbu), _max_finite(dBu))}
            if q == "delta*B*u":
                ctx.update({"delta there": float(d_t[b, c]), "B there": float(B[b, idx[2], t]),
                            "delta*B there": float(d_t[b, c] * B[b, idx[2], t]), "u there": float(u[b, c, t])})
            if q in ("h", "y", "out", "y+D*u"):
                ctx["max|h_{t-1}|"] = _max_finite(h_prev)
            if q == "h":
                ctx["delta*B*u there"] = float(dBu[idx])
                ctx["exp(delta*A) there"] = float(dA[idx])
                ctx["h_{t-1} there"] = float(h_prev[idx])
            if q in ("y", "y+D*u", "out"):
                ctx["max|h_t|"] = _max_finite(h)
                ctx["max|C_t|"] = _max_finite(C[:, :, t])
            if q in ("D*u", "y+D*u", "out"):
                ctx["max|D|"] = _max_finite(D)
                ctx["max|u_t|"] = _max_finite(u[:, :, t])
            if q == "out":
                ctx["max|silu(z_t)|"] = _max_finite(g)
            return finding(q, "scan", t, idx, v[idx], ctx, t + 1)
    return ScanAutopsy(block=name, quantity=None, kind=None, shape=shape, steps=L, block_out_finite=block_out_finite)


# ---------------------------------------------------------------------------------- the autopsy's probe

class _RemoveHandles:
    """Context manager removing hook handles on exit."""

    def __init__(self, handles: List[Any]) -> None:
        self.handles = handles

    def __enter__(self) -> "_RemoveHandles":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class ScanInputProbe:
    """A trace probe (:data:`prot_lib.diagnostics.trace.Probe`) that keeps every Mamba block's input.

    Entered around the failing step's replay by :func:`prot_lib.diagnostics.autopsy`: a forward
    pre-hook on every :class:`prot_lib.models.Mamba` under ``root`` keeps a reference to the block's
    input (no copy) and the trace's row count at that moment, so that after the replay
    :meth:`autopsy` can find the block around the trace's first non-finite row and run
    :func:`scan_autopsy` on exactly the input it received. Nothing runs during training.

    Args:
        root: qualified name of the traced submodule (the autopsy's ``trace_root``), so that block
            names match the trace's module names; None for the whole model.
    """

    def __init__(self, root: Optional[str] = None) -> None:
        self.root = root
        #: (trace rows before the call, block name, block, input, input's version counter)
        self.calls: List[Tuple[int, str, nn.Module, Tensor, int]] = []

    def __call__(self, model: nn.Module, rec) -> _RemoveHandles:
        root_module = model.get_submodule(self.root) if self.root else model
        handles = []
        for qual, module in root_module.named_modules():
            if not isinstance(module, Mamba):
                continue

            def pre_hook(mod, args, kwargs, qual=qual or "<model>"):
                x = args[0] if args else kwargs.get("hidden_states")
                if torch.is_tensor(x):
                    self.calls.append((len(rec.rows), qual, mod, x.detach(), x._version))
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        return _RemoveHandles(handles)

    def _call_before(self, order: int, module_name: str) -> Optional[Tuple[int, str, nn.Module, Tensor, int]]:
        """The latest block call entered before trace row ``order`` that contains ``module_name``."""
        hits = [c for c in self.calls if c[0] <= order and
                (c[1] == "<model>" or module_name == c[1] or module_name.startswith(c[1] + "."))]
        return hits[-1] if hits else None

    def block_call(self, trace) -> Optional[Tuple[int, str, nn.Module, Tensor, int]]:
        """The block call the trace's first non-finite forward row belongs to: the row is the block,
        one of its children (``in_proj``, ``conv1d``, ``x_proj``, ``out_proj``), or the next module after
        it (the module row just before the first non-finite row is the block or inside it); None
        otherwise (the first non-finite value is the loss, a gradient, or far from any block)."""
        row = trace.first_row("forward", ("module", "internal"))
        if row is None or not self.calls:
            return None
        order = int(row["order"])
        call = self._call_before(order, str(row["name"]))
        if call is not None:
            return call
        t = trace.table
        before = t[(t["phase"] == "forward") & (t["kind"] == "module") & (t["order"] < order)]
        if before.empty:
            return None
        return self._call_before(int(before["order"].iloc[-1]), str(before["name"].iloc[-1]))

    def autopsy(self, trace) -> Optional[ScanAutopsy]:
        """:func:`scan_autopsy` of the block call around the trace's first non-finite forward row
        (:meth:`block_call`). When the forward pass is finite, the first block (in execution order)
        holding a non-finite functional parameter: A_log = +inf gives exp(delta*A) = 0, a finite
        forward and NaN gradients, which the trace would blame on the first NaN gradient it meets.
        None when there is neither, or when the block's input was modified in place after the block
        read it (its saved reference no longer holds what the block saw)."""
        call = self.block_call(trace)
        if call is None and trace.first_row("forward", ("module", "internal")) is None:
            call = next((c for c in self.calls if _param_finding(c[2], c[1]) is not None), None)
        if call is None:
            return None
        _, name, block, x, version = call
        if x._version != version:
            return None
        return scan_autopsy(block, x, name)
