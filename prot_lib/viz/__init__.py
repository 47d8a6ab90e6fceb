"""Plots and widgets of the book.

- ``plots`` (:mod:`prot_lib.viz.plots`): curves per fold with the first non-finite step marked, heatmaps.
- ``scale_plots`` (:mod:`prot_lib.viz.scale_plots`): one block's scale map and a stack's growth layer by
  layer (the write-up's mechanism).
- ``notebook`` (:mod:`prot_lib.viz.notebook`): :func:`setup_chapter`, the one call of every chapter's setup cell.
- ``tables`` (:mod:`prot_lib.viz.tables`): a run's folds and a set of variants as tables with named columns.
- ``widgets`` (:mod:`prot_lib.viz.widgets`): the clip-value explorer (needs ipywidgets) and the static
  clip-sweep figure.

Everything is imported on first use, so ``import prot_lib.viz`` needs neither matplotlib nor ipywidgets.
"""
from importlib import import_module

_SUBMODULES = ("plots", "scale_plots", "notebook", "tables", "widgets")
_LAZY = {
    "set_style": "plots", "plot_fold_curves": "plots", "plot_loss_and_grad": "plots",
    "plot_clip_norms": "plots", "plot_lr": "plots", "plot_param_grad_heatmap": "plots",
    "plot_outcome_heatmap": "plots", "plot_activation_scales": "plots", "describe_divergence": "plots",
    "plot_clip_map": "plots", "plot_scale_map": "scale_plots", "setup_chapter": "notebook", "plot_layer_growth": "scale_plots",
    "clip_explorer": "widgets", "ClipExplorer": "widgets", "clip_sweep": "widgets",
    "plot_clip_run": "widgets", "plot_clip_sweep": "widgets", "describe_clip_run": "widgets",
    "describe_sweep": "widgets", "plot_adam_probe": "widgets", "adam_probe_ratios": "widgets",
    "fold_table": "tables", "outcome_table": "tables",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'prot_lib.viz' has no attribute {name!r}")


__all__ = list(_SUBMODULES) + sorted(_LAZY)
