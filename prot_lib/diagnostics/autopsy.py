"""NaN autopsy: replay the one training step that went non-finite and name where it started.

When a training step's loss or total gradient norm is non-finite, :class:`~prot_lib.diagnostics.policies.NonFiniteGuard`
(``training.on_nonfinite`` other than ``continue``) keeps a *snapshot* of that step: the module's
weights as they were when the step began (the step's forward and backward ran on them; the optimizer
has not stepped yet) and the step's batch. :func:`autopsy` replays exactly that step with a forward
hook on every module and a gradient hook on every module output and parameter
(:func:`prot_lib.diagnostics.trace_nonfinite`) and reports the first module, in execution order,
whose output (phase ``forward``) or gradient (phase ``backward``) is non-finite, or the loss (phase
``loss``), with max |x| and the non-finite count of its inputs and outputs.

The snapshot is also written as a *repro bundle* (:func:`save_bundle`, a ``torch.save`` file of
about 150 kB for the book's model): config, fold, step, seed, weights, batch. Replaying it needs no
data files and no training::

    python -m prot_lib autopsy runs/dyconex_unmitigated/fold0/nonfinite_step0.pt

prints the same report the training run printed (same weights, same batch, same code: bit-identical
on CPU).

How this compares with the usual tools:

- ``torch.autograd.detect_anomaly()`` names the backward operation that first produced a NaN, but
  checks every operation of every step (2-2.5x slower training, measured in
  ``benchmarks/bench_guards.py``) and does not see inf;
- JAX's ``jax_debug_nans`` re-runs the failing computation op by op once a NaN appears: the same
  idea as here, at module granularity;
- here finite steps pay only one fused check (the total gradient norm that clipping and logging
  compute anyway, and the loss), and the replay runs only for a failing step.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import pandas as pd
import torch

from ..training.config import RunConfig, config_from_dict
from .snapshot import module_loss_fn, snapshot_module
from .trace import TraceReport, trace_nonfinite

#: version of the bundle layout written by :func:`save_bundle`
BUNDLE_FORMAT = 1
PHASES = ("forward", "loss", "backward", "grad_norm", "none")
#: float32's largest finite value: a total gradient norm above sqrt of it overflows when squared
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class NonFiniteTrainingError(RuntimeError):
    """Training met a non-finite loss or gradient and its policy said to stop.

    Raised by :class:`~prot_lib.diagnostics.policies.NonFiniteGuard` under
    ``training.on_nonfinite: stop`` (at the first non-finite step) and under ``skip``/``rollback``
    (after ``training.max_consecutive_skips`` non-finite steps in a row). ``str(err)`` is the autopsy
    report followed by the bundle path.

    Attributes:
        report: the :class:`AutopsyReport` of the step (None if the replay itself failed).
        bundle_path: the repro bundle written before raising (None if it could not be written).
        fold, step: where it happened (``step``: Lightning's ``global_step`` before that step).
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
        reasons: what the training step itself saw: subset of ``"loss"`` (raw or back-propagated loss
            non-finite) and ``"grad"`` (total gradient L2 norm before clipping non-finite).
        trace: the replay's :class:`~prot_lib.diagnostics.TraceReport`; ``trace.table`` is the
            per-module table (one row per module output / gradient, in execution order).
        nonfinite_params: names of parameters already non-finite in the weights the step started from.
        seed: the fold's seed (``training.seed + fold``).
        grad_norm32: the replay's total gradient L2 norm as training computes it (float32,
            ``torch.nn.utils.get_total_norm``); inf when the squares overflow even if every gradient is finite.
        grad_norm64: the same norm computed in float64 (finite wherever the gradients are).
        largest_grad: ``(parameter name, float64 gradient norm)`` of the largest gradient.
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

    # ------------------------------------------------------------------ the finding
    @property
    def row(self) -> Optional[pd.Series]:
        """The trace row of the first non-finite value: forward (modules and the loss) first, then
        backward (module-output and parameter gradients); None when the replay stayed finite."""
        row = self.trace.first_row("forward", ("module", "loss"))
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
        """Qualified name (relative to the S6Regressor: ``embedding``, ``bimamba.layers.2.fwd.in_proj``,
        ``<model>`` for the regressor itself, ``loss``, or a parameter name in the backward phase; in
        the ``grad_norm`` phase the parameter with the largest gradient)."""
        row = self.row
        if row is None:
            return self.largest_grad[0] if self.phase == "grad_norm" and self.largest_grad else None
        return str(row["name"])

    @property
    def reproduced(self) -> bool:
        """True when the replay met a non-finite value, as the training step did."""
        return self.phase != "none"

    def verdict(self) -> str:
        """One sentence: where the non-finite value came from."""
        row, data = self.row, self.trace.nonfinite_data
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
                "grad_norm64": _json_float(self.grad_norm64)}

    # ------------------------------------------------------------------ words
    def __str__(self) -> str:
        where = ", ".join(f"{k} {v}" for k, v in (("fold", self.fold), ("step", self.step),
                                                    ("epoch", self.epoch)) if v is not None)
        saw = " and ".join({"loss": "a non-finite loss", "grad": "a non-finite gradient norm"}.get(r, r)
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


# ---------------------------------------------------------------------------------- replay

def _nonfinite_params(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def autopsy(snapshot: Dict[str, Any], config: RunConfig) -> AutopsyReport:
    """Replay the snapshot's step with hooks everywhere and say where the first non-finite value appeared.

    Args:
        snapshot: dict with ``state_dict`` (the LightningModule's weights before the step), ``batch``
            (``(x: (batch, L, F) float32, y: (batch,) float32)``) and optionally ``fold``, ``step``,
            ``epoch``, ``reasons``, ``seed``: what :class:`~prot_lib.diagnostics.policies.NonFiniteGuard`,
            :class:`~prot_lib.diagnostics.NonfiniteSnapshot` and :func:`load_bundle` give.
        config: the run's config (model shape, loss function, target masking).

    Returns:
        :class:`AutopsyReport`. The loss replayed is the raw training loss, before the write-up's
        sanitisation (:func:`prot_lib.diagnostics.module_loss_fn`).

    The global torch RNG is saved and restored around the replay (building the module draws initial
    weights), so calling this in the middle of training does not change the rest of the run.

    Raises:
        RuntimeError: the weights do not fit the config's model (``load_state_dict(strict=True)``).
    """
    with torch.random.fork_rng(devices=[]):
        module = snapshot_module(snapshot, config)
    module.train()
    x, y = snapshot["batch"][0], snapshot["batch"][1]
    loss_fn = module_loss_fn(module)
    trace = trace_nonfinite(module.model, x, y, loss_fn)
    norm32, norm64, largest = _gradient_norms(module.model, x, y, loss_fn)
    return AutopsyReport(fold=snapshot.get("fold"), step=snapshot.get("step"), epoch=snapshot.get("epoch"),
                         reasons=list(snapshot.get("reasons", [])), trace=trace,
                         nonfinite_params=_nonfinite_params(snapshot["state_dict"]), seed=snapshot.get("seed"),
                         grad_norm32=norm32, grad_norm64=norm64, largest_grad=largest)


def _gradient_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn
                    ) -> Tuple[Optional[float], Optional[float], Optional[Tuple[str, float]]]:
    """Total gradient L2 norm of ``loss_fn(model(x), y)`` in float32 (as training measures it) and in
    float64, and the parameter with the largest gradient. A float32 norm can be inf with every
    gradient finite: squares above ~1.8e19 overflow. One extra forward and backward pass."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        if not loss.requires_grad:
            return None, None, None
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    named = [(n, g) for (n, _), g in zip(params, grads) if g is not None]
    if not named:
        return None, None, None
    norm32 = float(torch.nn.utils.get_total_norm([g for _, g in named], norm_type=2.0))
    norms64 = {n: float(torch.linalg.vector_norm(g.double())) for n, g in named}
    norm64 = math.sqrt(sum(v * v for v in norms64.values()))
    name = max(norms64, key=lambda k: norms64[k] if math.isfinite(norms64[k]) else math.inf)
    return norm32, norm64, (name, norms64[name])


# ---------------------------------------------------------------------------------- bundles

def bundle_path(fold_dir: Union[str, Path], step: int) -> Path:
    """``<fold_dir>/nonfinite_step<step>.pt``, e.g. ``runs/dyconex_unmitigated/fold0/nonfinite_step0.pt``."""
    return Path(fold_dir) / f"nonfinite_step{int(step)}.pt"


def save_bundle(path: Union[str, Path], snapshot: Dict[str, Any], config: RunConfig) -> Path:
    """Write a repro bundle atomically (temp file in the same folder, then ``os.replace``).

    Contents (``torch.save`` dict): ``format``, ``config`` (``RunConfig.to_dict()``), ``fold``, ``step``,
    ``epoch``, ``seed``, ``reasons``, ``record`` (the step's numbers), ``state_dict`` (weights before
    the step), ``batch`` (``(x, y)``), ``torch`` (version). Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": BUNDLE_FORMAT, "config": config.to_dict(), "torch": torch.__version__}
    for key in ("fold", "step", "epoch", "seed", "reasons", "record", "state_dict", "batch"):
        payload[key] = snapshot.get(key)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_bundle(path: Union[str, Path]) -> Tuple[Dict[str, Any], RunConfig]:
    """Read a bundle written by :func:`save_bundle`: ``(snapshot, config)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a repro bundle (missing keys or unknown format).
        prot_lib.training.ConfigError: its config does not validate with this version of the library.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no repro bundle at {path}")
    # The bundle holds a config dict and tensors only, but the batch may be a tuple: plain torch.load.
    d = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(d, dict) or d.get("format") != BUNDLE_FORMAT or "state_dict" not in d or "batch" not in d:
        raise ValueError(f"{path} is not a prot_lib repro bundle (format {BUNDLE_FORMAT})")
    config = config_from_dict(d["config"], source=f"{path} (bundle config)")
    return d, config


def autopsy_bundle(path: Union[str, Path]) -> AutopsyReport:
    """:func:`autopsy` of a bundle file: what ``python -m prot_lib autopsy BUNDLE`` prints."""
    snapshot, config = load_bundle(path)
    return autopsy(snapshot, config)
