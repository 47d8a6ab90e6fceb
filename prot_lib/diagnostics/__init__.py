"""Diagnostics: where a non-finite value was born, and what to keep from a run to find out.

Nothing here knows the book's Lightning module: every function takes any ``nn.Module``.

- :func:`trace_nonfinite`, :func:`trace_step` (``trace.py``): one traced forward/backward pass of any
  ``nn.Module``; the :class:`TraceReport` names the first module output, loss or gradient that went
  inf/NaN. Probes (:class:`TraceRecorder`) add quantities inside a module.
- :func:`autopsy` (``autopsy.py``): replay the step that went non-finite (:func:`capture_step`) and name
  the first module and phase (forward, loss, backward, grad_norm) where it happened; repro bundles
  (:func:`save_bundle`, :func:`autopsy_bundle`, ``python -m prot_lib autopsy BUNDLE``) and
  :class:`NonFiniteTrainingError`.
- :mod:`~prot_lib.diagnostics.grads`: gradient norms without float32 overflow, shared per step.
- :class:`NonfiniteSnapshot`, :class:`ScaleRecorder` (``snapshot.py``): callbacks keeping the weights
  and batch of the first bad step, and max |output| of chosen submodules at every step.
- :func:`capture_scan` (``trace.py``): the arguments and result of one Mamba block's selective scan
  (the one step of the model that is a function, not a module, so hooks do not see it).
- :func:`scan_autopsy` (``scan_autopsy.py``): the first non-finite quantity inside one Mamba block
  (a functional parameter, delta, exp(delta*A), delta*B*u, h_t, y_t, D skip, gate), its step t and
  (batch, channel[, state]); the autopsy runs it on the failing step's replay (``report.scan``).
- :class:`InjectFault` (``faults.py``): a callback planting inf/NaN in a weight, gradient or Adam state.
- ``missing.py``: masking missing labels versus ``nan_to_num``.
- ``scan_state.py``: the scan's memory 1 / (1 - exp(delta * A)) and what sequence length does to a
  block's scale (:func:`effective_memory`, :func:`state_growth_by_length`, :func:`fixed_point_by_length`).

The safety nets built on these (guard, gradient monitor, adaptive clipping, finite checkpoints, data
guard) are Lightning callbacks in :mod:`prot_lib.callbacks`.
"""
from .autopsy import (AutopsyReport, NonFiniteTrainingError, autopsy, autopsy_bundle, bundle_path, capture_step,
                      load_bundle, save_bundle)
from .faults import InjectFault
from .scan_autopsy import ScanAutopsy, ScanInputProbe, scan_autopsy
from .grads import GradNorms, grad_norms, total_grad_norm
from .scan_state import (accumulated_terms, effective_memory, fixed_point_by_length, init_step_sizes,
                         overflow_scale_by_length, scan_memory_table, stack_overflow_by_length, stack_summary,
                         state_growth_by_length)
from .snapshot import NonfiniteSnapshot, ScaleRecorder, clone_batch, params_all_finite
from .trace import TRACE_COLUMNS, TraceRecorder, TraceReport, capture_scan, tensor_stats, trace_nonfinite, trace_step

__all__ = [
    "trace_nonfinite", "trace_step", "TraceReport", "TraceRecorder", "TRACE_COLUMNS", "tensor_stats",
    "capture_scan", "NonfiniteSnapshot", "ScaleRecorder", "clone_batch", "params_all_finite", "autopsy",
    "autopsy_bundle", "capture_step", "AutopsyReport", "NonFiniteTrainingError", "save_bundle", "load_bundle",
    "bundle_path", "InjectFault", "GradNorms", "grad_norms", "total_grad_norm", "scan_autopsy", "ScanAutopsy",
    "ScanInputProbe", "effective_memory", "accumulated_terms", "init_step_sizes", "scan_memory_table",
    "state_growth_by_length", "fixed_point_by_length", "stack_overflow_by_length", "overflow_scale_by_length",
    "stack_summary",
]
