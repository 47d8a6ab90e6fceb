"""Diagnostics: where a non-finite value was born, and what to keep from a run to find out.

- :func:`trace_nonfinite` (``trace.py``): one traced forward/backward pass of any ``nn.Module``;
  the :class:`TraceReport` names the first module output, loss or gradient that went inf/NaN.
- :class:`NonfiniteSnapshot` (``snapshot.py``): a Lightning callback keeping the weights and batch
  of the first optimizer step that went non-finite; :func:`trace_snapshot` traces that step.
- :class:`ScaleRecorder` (``snapshot.py``): max |output| of chosen submodules at every step.
- :func:`capture_scan` (``trace.py``): the arguments and result of one Mamba block's selective scan
  (the one step of the model that is a function, not a module, so hooks do not see it).
- :func:`autopsy` (``autopsy.py``): replay the step that went non-finite and name the first module and
  phase (forward, loss, backward, grad_norm) where it happened; repro bundles
  (:func:`save_bundle`, :func:`autopsy_bundle`, ``python -m prot_lib autopsy BUNDLE``) and
  :class:`NonFiniteTrainingError`.
- :class:`NonFiniteGuard` (``policies.py``): ``training.on_nonfinite`` stop | skip | rollback.
- :class:`InjectFault` (``faults.py``): a callback planting inf/NaN in a weight, gradient or Adam state.
"""
from .autopsy import (AutopsyReport, NonFiniteTrainingError, autopsy, autopsy_bundle, bundle_path, load_bundle,
                      save_bundle)
from .faults import InjectFault
from .policies import NonFiniteGuard, early_stopping, make_guard
from .snapshot import NonfiniteSnapshot, ScaleRecorder, module_loss_fn, snapshot_module, trace_snapshot
from .trace import TRACE_COLUMNS, TraceReport, capture_scan, tensor_stats, trace_nonfinite

__all__ = [
    "trace_nonfinite", "TraceReport", "TRACE_COLUMNS", "tensor_stats", "capture_scan",
    "NonfiniteSnapshot", "ScaleRecorder", "snapshot_module", "module_loss_fn", "trace_snapshot",
    "autopsy", "autopsy_bundle", "AutopsyReport", "NonFiniteTrainingError", "save_bundle", "load_bundle",
    "bundle_path", "NonFiniteGuard", "make_guard", "early_stopping", "InjectFault",
]
