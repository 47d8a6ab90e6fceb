"""NaN autopsy: replay the one training step that went non-finite and name where it started.

When a training step's loss or total gradient norm is non-finite, :class:`prot_lib.callbacks.NonFiniteGuard`
keeps a *snapshot* of that step (:func:`capture_step`): the model as it was when the step began (its
forward and backward ran on these weights; the optimizer has not stepped yet), the step's batch and
the function that computed the loss. :func:`autopsy` replays exactly that step with a forward hook on
every module and a gradient hook on every module output and parameter
(:func:`prot_lib.diagnostics.trace_step`) and reports the first module, in execution order, whose
output (phase ``forward``) or gradient (phase ``backward``) is non-finite, or the loss (phase
``loss``), with max |x| and the non-finite count of its inputs and outputs.

Nothing here knows a particular model: the snapshot holds the model itself, rebuilt from its class
path, constructor arguments (a LightningModule's ``hparams``, Lightning's own convention) and
``state_dict``, or pickled whole when it has no ``hparams``; the loss is the module's own
``training_step`` unless the caller names another function (``prot_lib`` passes the raw, unsanitised
loss of its own module). The snapshot is also written as a *repro bundle* (:func:`save_bundle`, a
``torch.save`` file of about 150 kB for the book's model). Replaying it needs no data files and no
training::

    python -m prot_lib autopsy runs/dyconex_unmitigated/fold0/nonfinite_step0.pt

prints the same report the training run printed (same weights, same batch, same code: bit-identical
on CPU). The bundle is a pickle (``torch.load(weights_only=False)``): open only bundles you trust, as
with any Lightning checkpoint.

Inside the S6 scan (issue 9 sec. 3): the scan is a function, not a module, and ``A_log``, ``D`` and
``dt_proj`` are used functionally, so module hooks blame a NaN born there on the next module
("``...out_proj`` received non-finite inputs"). During the replay a forward pre-hook keeps every
:class:`prot_lib.models.Mamba` block's input (:class:`prot_lib.diagnostics.scan_autopsy.ScanInputProbe`);
when the first non-finite forward value is in a block (the block, or its ``in_proj``/``conv1d``/
``x_proj``/``out_proj``) or in the module right after one, :func:`prot_lib.diagnostics.scan_autopsy`
recomputes that block's scan step by step and the report's :attr:`AutopsyReport.scan` names the
quantity (a functional parameter, delta, exp(delta*A), delta*B*u, h_t, y_t, the D skip, the gate),
the step t and (batch, channel[, state]). ``phase`` and ``module`` still name what the hooks saw;
``verdict()`` names the birth place inside the scan. Only failing steps are replayed, so finite steps
never pay for any of it. :func:`autopsy` also accepts further *probes*
(:class:`prot_lib.diagnostics.TraceRecorder`), entered around the replay only.

How this compares with the usual tools:

- ``torch.autograd.detect_anomaly()`` names the backward operation that first produced a NaN, but
  checks every operation of every step (2-2.5x slower training, measured in
  ``benchmarks/bench_guards.py``) and does not see inf;
- JAX's ``jax_debug_nans`` re-runs the failing computation op by op once a NaN appears: the same
  idea as here, at module granularity;
- here finite steps pay only one fused check (the total gradient norm and the loss), and the replay
  runs only for a failing step.
"""
from __future__ import annotations

import importlib
import io
import math
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import pandas as pd
import torch
from torch import nn

from ..utils.io import atomic_torch_save
from .grads import norms_of_grads
from .snapshot import clone_batch
from .scan_autopsy import ScanAutopsy, ScanInputProbe
from .trace import Probe, TraceReport, trace_step

#: version of the bundle layout written by :func:`save_bundle` (1: prot_lib 0.1's NaNStudyModule-only bundles)
BUNDLE_FORMAT = 2
PHASES = ("forward", "loss", "backward", "grad_norm", "none")
#: float32's largest finite value: a total gradient norm above sqrt of it overflows when squared
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: probes entered around every replay when :func:`autopsy` is given none (empty: the hook point; the
#: scan autopsy's own probe is added by ``autopsy(scan=True)``, not listed here)
DEFAULT_PROBES: List[Probe] = []


class NonFiniteTrainingError(RuntimeError):
    """Training met a non-finite loss or gradient and its policy said to stop.

    Raised by :class:`prot_lib.callbacks.NonFiniteGuard` under ``policy="stop"`` (at the first
    non-finite step) and under ``"skip"``/``"rollback"`` (after ``max_consecutive`` non-finite steps in
    a row). ``str(err)`` is the autopsy report followed by the bundle path. Importable from
    ``prot_lib.callbacks`` and ``prot_lib.diagnostics``.

    Attributes:
        report: the :class:`AutopsyReport` of the step (None when the autopsy was off or failed).
        bundle_path: the repro bundle written before raising (None if none was written).
        fold, step: where it happened (``step``: Lightning's ``global_step`` before that step; ``fold``
            from the guard's ``meta``, None outside a k-fold run).
        history: the fold's per-step history up to the failing step (a DataFrame, set by
            :func:`prot_lib.training.kfold.train_fold`; None otherwise).
    """

    def __init__(self, message: str, report: Optional["AutopsyReport"] = None,
                 bundle_path: Optional[Path] = None, fold: Optional[int] = None, step: Optional[int] = None):
        super().__init__(message)
        self.report = report
        self.bundle_path = bundle_path
        self.fold = fold
        self.step = step
        self.history: Optional[pd.DataFrame] = None


def _fmt(v: Any) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(v) else f"{v:.4g}"


def _json_float(v: Any) -> Union[float, str, None]:
    """A float for JSON: finite as is, inf/nan as the strings "inf", "-inf", "nan" (JSON has none)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else str(v)


@dataclass
class AutopsyReport:
    """What :func:`autopsy` found about one non-finite training step.

    Attributes:
        fold, step, epoch: where (``step`` = Lightning's ``global_step`` before the step; None if unknown).
        reasons: what the training step itself saw: subset of ``"loss"`` (the back-propagated loss
            non-finite) and ``"grad"`` (a gradient non-finite before clipping).
        trace: the replay's :class:`~prot_lib.diagnostics.TraceReport`; ``trace.table`` is the
            per-module table (one row per module output / gradient, in execution order).
        nonfinite_params: names of parameters already non-finite in the weights the step started from.
        seed: the fold's seed (``training.seed + fold``; from the snapshot's meta, None if not given).
        grad_norm32: the replay's total gradient L2 norm as ``torch.nn.utils.get_total_norm`` and
            Lightning's ``gradient_clip_val`` compute it (float32); inf when the squares overflow even
            if every gradient is finite.
        grad_norm64: the same norm computed in float64 (finite wherever the gradients are).
        largest_grad: ``(parameter name, float64 gradient norm)`` of the largest gradient.
        scan: the :class:`~prot_lib.diagnostics.scan_autopsy.ScanAutopsy` of the Mamba block around the
            first non-finite forward value (the block, one of its children, or the module right after
            it), naming the first non-finite quantity inside its scan with its step t and indices; with
            a finite forward, the first block holding a non-finite functional parameter (A_log, D,
            dt_proj); None when the first non-finite value is elsewhere (or the scan autopsy was off).
    """

    fold: Optional[int]
    step: Optional[int]
    epoch: Optional[int]
    reasons: List[str]
    trace: TraceReport
    nonfinite_params: List[str] = field(default_factory=list)
    seed: Optional[int] = None
    grad_norm32: Optional[float] = None
    grad_norm64: Optional[float] = None
    largest_grad: Optional[Tuple[str, float]] = None
    scan: Optional[ScanAutopsy] = None

    # ------------------------------------------------------------------ the finding
    @property
    def row(self) -> Optional[pd.Series]:
        """The trace row of the first non-finite value: forward (modules and the loss) first, then
        backward (module-output and parameter gradients); None when the replay stayed finite."""
        row = self.trace.first_row("forward", ("module", "internal", "loss"))
        if row is None and self.trace.backward_ran:
            row = self.trace.first_row("backward", ("module", "parameter"))
        return row

    @property
    def phase(self) -> str:
        """``"forward"`` (a module's output), ``"loss"`` (finite predictions, non-finite loss),
        ``"backward"`` (forward and loss finite, a gradient non-finite), ``"grad_norm"`` (every
        gradient finite, but their total L2 norm overflows float32: what clipping and the guard
        measure) or ``"none"`` (the replay is finite: the failure did not reproduce)."""
        row = self.row
        if row is None:
            if self.grad_norm32 is not None and not math.isfinite(self.grad_norm32):
                return "grad_norm"
            return "none"
        if row["phase"] == "backward":
            return "backward"
        return "loss" if row["kind"] == "loss" else "forward"

    @property
    def module(self) -> Optional[str]:
        """Qualified name relative to the traced root (the snapshot's ``trace_root``; for ``prot_lib``'s
        own module the S6Regressor: ``embedding``, ``bimamba.layers.2.fwd.in_proj``), ``<model>`` for
        the root itself, ``loss``, a probe's ``module:quantity``, or a parameter name in the backward
        phase; in the ``grad_norm`` phase the parameter with the largest gradient."""
        row = self.row
        if row is None:
            return self.largest_grad[0] if self.phase == "grad_norm" and self.largest_grad else None
        return str(row["name"])

    @property
    def reproduced(self) -> bool:
        """True when the replay met a non-finite value, as the training step did."""
        return self.phase != "none"

    def verdict(self) -> str:
        """One sentence: where the non-finite value came from. When the scan autopsy found the birth
        place inside a Mamba block (a functional parameter or a quantity of its scan), that is the
        sentence, followed by the module where hooks first saw it."""
        row, data = self.row, self.trace.nonfinite_data
        # the scan's finding, unless a module that runs before the scan (in_proj, conv1d, x_proj) gave birth
        inside = self.scan is not None and self.scan.born_inside
        if self.phase == "forward" and inside and (not row["born"] or row["name"] == self.scan.block):
            return f"{self.scan.sentence()} (module hooks first see it at `{row['name']}`)"
        if self.phase == "backward" and self.scan is not None and self.scan.kind == "parameter":
            what = "parameter" if row["kind"] == "parameter" else "the output of"
            return f"{self.scan.sentence()}; the first non-finite gradient is that of {what} `{row['name']}`"
        if self.phase == "grad_norm":
            name, g = self.largest_grad or ("?", math.nan)
            return (f"every gradient is finite, but their total L2 norm ({_fmt(self.grad_norm64)} in float64) "
                    f"squared exceeds float32's max {FLOAT32_MAX:.3g}; the largest is `{name}`'s ({_fmt(g)})")
        if row is None:
            return ("the replay is finite: the failure did not reproduce (the step was not "
                    "deterministic, or it failed in the optimizer update)")
        if self.phase == "forward":
            if data.get("input", 0) and row["nonfinite_in"]:
                return (f"not born in the model: the batch already held {data['input']} non-finite "
                        f"input values, and `{row['name']}` is the first module they reach")
            if row["params_finite"] is False:
                return f"`{row['name']}`'s own parameters were already non-finite before the step"
            if row["born"]:
                return (f"born in `{row['name']}`: finite inputs (max |x| {_fmt(row['max_abs_in'])}) "
                        f"and finite parameters gave a non-finite output")
            return f"`{row['name']}` received non-finite inputs"
        if self.phase == "loss":
            if data.get("target", 0):
                return (f"the predictions are finite but {data['target']} targets are non-finite: "
                        f"the loss takes them in")
            return (f"the predictions are finite (max |pred| {_fmt(row['max_abs_in'])}) but the loss "
                    f"overflowed float32")
        what = "parameter" if row["kind"] == "parameter" else "the output of"
        return (f"forward and loss are finite (loss {_fmt(self.trace.loss)}); the first non-finite "
                f"gradient is that of {what} `{row['name']}`")

    def summary(self) -> Dict[str, Any]:
        """JSON-ready dict: fold, step, epoch, reasons, phase, module, its stats, verdict."""
        row = self.row
        stats = {}
        if row is not None:
            stats = {k: (int(row[k]) if k.startswith("nonfinite") or k == "numel" else _json_float(row[k]))
                     for k in ("max_abs_in", "nonfinite_in", "max_abs_out", "nonfinite_out", "numel")}
        return {"fold": self.fold, "step": self.step, "epoch": self.epoch, "reasons": list(self.reasons),
                "phase": self.phase, "module": self.module, "type": None if row is None else str(row["type"]),
                **stats, "nonfinite_params": list(self.nonfinite_params), "verdict": self.verdict(),
                "loss": _json_float(self.trace.loss), "grad_norm32": _json_float(self.grad_norm32),
                "grad_norm64": _json_float(self.grad_norm64),
                "scan": None if self.scan is None else self.scan.summary()}

    # ------------------------------------------------------------------ words
    def __str__(self) -> str:
        where = ", ".join(f"{k} {v}" for k, v in (("fold", self.fold), ("step", self.step),
                                                    ("epoch", self.epoch)) if v is not None)
        saw = " and ".join({"loss": "a non-finite loss", "grad": "a non-finite gradient"}.get(r, r)
                           for r in self.reasons) or "nothing non-finite"
        lines = [f"NaN autopsy ({where}): the training step saw {saw}"]
        row = self.row
        if self.phase == "grad_norm":
            lines.append(f"first non-finite: grad_norm: the total gradient norm (float32: {_fmt(self.grad_norm32)})")
        elif row is None:
            lines.append("first non-finite: none in the replay")
        else:
            kind = {"forward": "output", "loss": "value", "backward": "gradient"}[self.phase]
            lines.append(f"first non-finite: {self.phase} {kind} of `{row['name']}` ({row['type']})")
            if self.phase != "backward":
                lines.append(f"  inputs : max |x| {_fmt(row['max_abs_in'])}, "
                             f"{int(row['nonfinite_in'])} non-finite")
                lines.append(f"  outputs: max |x| {_fmt(row['max_abs_out'])}, "
                             f"{int(row['nonfinite_out'])} of {int(row['numel'])} non-finite")
            else:
                lines.append(f"  gradient: max |g| {_fmt(row['max_abs_out'])}, "
                             f"{int(row['nonfinite_out'])} of {int(row['numel'])} non-finite")
        lines.append(f"  verdict: {self.verdict()}")
        if self.scan is not None:
            lines.append(f"  inside the scan: {self.scan}")
        bad = self.nonfinite_params
        if self.grad_norm64 is not None:
            name, g = self.largest_grad or ("?", math.nan)
            lines.append(f"total gradient norm: float32 {_fmt(self.grad_norm32)}, float64 {_fmt(self.grad_norm64)}; "
                         f"largest: `{name}` {_fmt(g)}")
        lines.append("weights before the step: " + ("all finite" if not bad else
                     f"{len(bad)} non-finite parameter tensors: " + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")))
        lines.append("replay trace:")
        lines.extend("  " + ln for ln in str(self.trace).splitlines())
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return "```\n" + str(self) + "\n```"


# ---------------------------------------------------------------------------------- snapshots

def _nonfinite_params(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def _import_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _hparams(model: nn.Module) -> Optional[Dict[str, Any]]:
    hp = getattr(model, "hparams", None)
    return dict(hp) if isinstance(hp, Mapping) and len(hp) else None


def _rebuild(spec: Dict[str, Any]) -> nn.Module:
    """The model of a snapshot spec: ``cls(**hparams)`` + ``load_state_dict(strict=True)``, or unpickled."""
    if spec["kind"] == "hparams":
        with torch.random.fork_rng(devices=[]):  # construction draws initial weights
            model = _import_class(spec["class"])(**spec["hparams"])
        model.load_state_dict(spec["state_dict"], strict=True)
        return model
    if spec["kind"] == "pickle":
        return torch.load(io.BytesIO(spec["pickle"]), map_location="cpu", weights_only=False)
    raise ValueError(f"the snapshot holds only the weights of a {spec['class']} (its constructor arguments are "
                     "unknown and it could not be pickled): pass model=<a fresh instance> to autopsy()")


def model_spec(model: nn.Module) -> Tuple[Dict[str, Any], Optional[nn.Module]]:
    """How to rebuild ``model`` with its current weights: ``(spec, rebuilt model or None)``.

    Tried in order, each checked by actually rebuilding:

    1. ``kind="hparams"``: class path + ``model.hparams`` (a LightningModule that called
       ``save_hyperparameters``) + ``state_dict``; Lightning's ``load_from_checkpoint`` convention;
    2. ``kind="pickle"``: the model pickled whole (``torch.save``; fails for closures, open files);
    3. ``kind="state_dict"``: class path + ``state_dict`` only; the replay then needs the caller to
       pass a fresh instance (``autopsy(..., model=...)``).
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hp = _hparams(model)
    if hp is not None:
        spec = {"kind": "hparams", "class": _class_path(model), "hparams": hp, "state_dict": state}
        try:
            return spec, _rebuild(spec)
        except Exception:  # noqa: BLE001 - any constructor failure means: try the next way
            pass
    try:
        buf = io.BytesIO()
        torch.save(model, buf)
        spec = {"kind": "pickle", "class": _class_path(model), "pickle": buf.getvalue()}
        return spec, _rebuild(spec)
    except Exception:  # noqa: BLE001
        return {"kind": "state_dict", "class": _class_path(model), "state_dict": state}, None


def training_step_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss a LightningModule's own ``training_step(batch, 0)`` returns (a tensor, or a dict's
    ``"loss"``). The default loss of a replay. ``self.log`` outside a Trainer only warns (silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.training_step(batch, 0)
    return out["loss"] if isinstance(out, Mapping) else out


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001 - lambdas, closures, local classes
        return False


def capture_step(model: nn.Module, batch: Any, loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
                 trace_root: Optional[str] = None, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Snapshot one training step for :func:`autopsy` and :func:`save_bundle`.

    Call it before the optimizer steps (``on_before_optimizer_step``), so the weights are those the
    step's forward and backward ran on.

    Args:
        model: the module that trained (a LightningModule or any ``nn.Module``).
        batch: the step's batch (deep-copied).
        loss_fn: ``loss_fn(model, batch) -> scalar`` to replay (default :func:`training_step_loss`).
            A function that cannot be pickled (a lambda) is used for an in-process replay, but the
            bundle falls back to the default (its ``meta["loss_fn_note"]`` says so).
        trace_root: submodule whose modules the report names (default: the whole model).
        meta: anything JSON-like to keep: ``fold``, ``step``, ``epoch``, ``seed``, ``reasons`` are read
            by the report.

    Returns:
        the snapshot: ``{"format", "model": spec, "batch", "loss_fn", "trace_root", "meta"}``; the rebuilt
        model rides along under ``"_model"`` (not saved).
    """
    spec, rebuilt = model_spec(model)
    meta = dict(meta or {})
    saved_fn = loss_fn
    if loss_fn is not None and not _picklable(loss_fn):
        saved_fn = None
        meta["loss_fn_note"] = f"{loss_fn!r} cannot be pickled: the bundle replays training_step instead"
    snap = {"format": BUNDLE_FORMAT, "model": spec, "batch": clone_batch(batch), "loss_fn": saved_fn,
            "trace_root": trace_root, "meta": meta, "torch": torch.__version__}
    snap["_model"], snap["_loss_fn"] = rebuilt, loss_fn
    return snap


# ---------------------------------------------------------------------------------- replay

def autopsy(snapshot: Dict[str, Any], model: Optional[nn.Module] = None,
            probes: Optional[Sequence[Probe]] = None, scan: bool = True) -> AutopsyReport:
    """Replay the snapshot's step with hooks everywhere and say where the first non-finite value appeared.

    Args:
        snapshot: from :func:`capture_step` or :func:`load_bundle`.
        model: an instance of the snapshot's model class to replay on (needed only when the snapshot
            could keep neither the constructor arguments nor a pickle of the model); its weights are
            replaced by the snapshot's.
        probes: entered around the replay (default :data:`DEFAULT_PROBES`).
        scan: look inside the Mamba block around the first non-finite forward value
            (:class:`~prot_lib.diagnostics.scan_autopsy.ScanInputProbe`; its result is ``report.scan``).
            Costs one forward pre-hook per block during the replay, and one more forward of that block
            plus its scan recomputed up to the failing step when there is such a block.

    Returns:
        :class:`AutopsyReport`.

    The global torch RNG is saved and restored around the replay, so calling this in the middle of
    training does not change the rest of the run. The model replays in training mode.

    Raises:
        ValueError: the model cannot be rebuilt (see :func:`model_spec`) and none was given.
        RuntimeError: the weights do not fit ``model`` (``load_state_dict(strict=True)``).
        Any exception of the replayed step itself.
    """
    spec = snapshot["model"]
    if model is not None:
        model.load_state_dict(spec["state_dict"] if "state_dict" in spec else _rebuild(spec).state_dict(), strict=True)
    else:
        model = snapshot.get("_model") or _rebuild(spec)
    loss_fn = snapshot.get("_loss_fn") or snapshot.get("loss_fn") or training_step_loss
    root = snapshot.get("trace_root")
    batch = snapshot["batch"]
    meta = snapshot.get("meta", {})
    with torch.random.fork_rng(devices=[]):
        model.train()
        scan_probe = ScanInputProbe(root) if scan else None
        all_probes = list(DEFAULT_PROBES if probes is None else probes) + ([scan_probe] if scan_probe else [])
        trace = trace_step(model, loss_fn, batch, root=root, probes=all_probes)
        scan_report = scan_probe.autopsy(trace) if scan_probe is not None else None
        norm32, norm64, largest = _gradient_norms(model, root, loss_fn, batch)
    return AutopsyReport(fold=meta.get("fold"), step=meta.get("step"), epoch=meta.get("epoch"),
                         reasons=list(meta.get("reasons", [])), trace=trace,
                         nonfinite_params=_nonfinite_params(model.state_dict()), seed=meta.get("seed"),
                         grad_norm32=norm32, grad_norm64=norm64, largest_grad=largest, scan=scan_report)


def _gradient_norms(model: nn.Module, root: Optional[str], loss_fn, batch
                    ) -> Tuple[Optional[float], Optional[float], Optional[Tuple[str, float]]]:
    """Total gradient L2 norm of the step's loss over ``root``'s parameters in float32 (as
    ``get_total_norm`` and Lightning's clipping measure it) and without overflow
    (:mod:`prot_lib.diagnostics.grads`), and the parameter with the largest gradient (names relative to
    ``root``). A float32 norm can be inf with every gradient finite: squares above ~1.8e19 overflow.
    One extra forward and backward pass."""
    root_module = model.get_submodule(root) if root else model
    params = [(n, p) for n, p in root_module.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        if not loss.requires_grad:
            return None, None, None
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    named = [(n, g) for (n, _), g in zip(params, grads) if g is not None]
    if not named:
        return None, None, None
    norm32 = float(torch.nn.utils.get_total_norm([g for _, g in named], norm_type=2.0))
    norms = norms_of_grads(named)
    return norm32, norms.total_value(), norms.largest()


# ---------------------------------------------------------------------------------- bundles

def bundle_path(fold_dir: Union[str, Path], step: int) -> Path:
    """``<fold_dir>/nonfinite_step<step>.pt``, e.g. ``runs/dyconex_unmitigated/fold0/nonfinite_step0.pt``."""
    return Path(fold_dir) / f"nonfinite_step{int(step)}.pt"


def save_bundle(path: Union[str, Path], snapshot: Dict[str, Any]) -> Path:
    """Write a snapshot (:func:`capture_step`) as a repro bundle, atomically (:func:`prot_lib.utils.io.atomic_torch_save`).

    Contents (``torch.save`` dict): ``format`` (:data:`BUNDLE_FORMAT`), ``model`` (the spec of
    :func:`model_spec`), ``batch``, ``loss_fn`` (a picklable function or None), ``trace_root``,
    ``meta`` (``fold``, ``step``, ``epoch``, ``seed``, ``reasons``, ...), ``torch`` (version). Returns the path.
    """
    payload = {k: v for k, v in snapshot.items() if not k.startswith("_")}
    return atomic_torch_save(payload, path)


def load_bundle(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a bundle written by :func:`save_bundle` (the snapshot dict).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a repro bundle of this format (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no repro bundle at {path}")
    # The bundle holds the model's spec, a batch and a function reference: plain torch.load.
    d = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(d, dict) or "model" not in d or "batch" not in d:
        raise ValueError(f"{path} is not a prot_lib repro bundle")
    if d.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path} is a format {d.get('format')} bundle; this prot_lib reads format {BUNDLE_FORMAT} "
                         "(re-run the training to write a new one)")
    return d


def autopsy_bundle(path: Union[str, Path], model: Optional[nn.Module] = None,
                   probes: Optional[Sequence[Probe]] = None) -> AutopsyReport:
    """:func:`autopsy` of a bundle file: what ``python -m prot_lib autopsy BUNDLE`` prints. Raises as
    :func:`load_bundle` and :func:`autopsy`."""
    return autopsy(load_bundle(path), model=model, probes=probes)
