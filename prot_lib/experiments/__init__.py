"""Experiments: sweeps over configurations, run by one engine on every core or on a Dask cluster.

Above ``training`` (which trains one k-fold run and says each fold's fate) and below ``viz``:

- ``cells.py``: a :class:`Cell` (a config, its folds, ``max_steps``), the grid builder
  :func:`grid_cells`, the clip-setting labels, and the rows a cell returns (:data:`ROW_COLUMNS`: each
  fold's fate, read from the k-fold summary, plus a few history magnitudes);
- ``engine.py``: :func:`run_cells`, the one engine: ``local`` (joblib/loky, one process per core, one
  thread each) or ``dask`` (``dask_engine.py``: a LocalCluster or a running scheduler), each cell's
  result written under ``out/cells/`` as it finishes, so an interrupted sweep resumes; a tqdm bar;
- ``specs.py``: the sweep specs, YAML in ``prot_lib/configs/sweeps/``; ``sweeps.py``: :func:`run_sweep`,
  what ``python -m prot_lib sweep NAME`` runs, and the analysis of each kind;
- the book's sweeps as functions: ``fix_matrix.py`` (chapter 9), ``stability.py`` (the stability map of
  chapters 9 and 10, chapter 4's clip sweep, and the tables reading them), ``seeds.py`` (seed rates);
- ``quick.py``: one short training in this process (the clip explorer, chapter 4's Adam probe);
- ``recommended.py``: the configuration chapter 9 recommends (``prot_lib/configs/recommended/``);
  ``ablation.py``: that configuration against each of its parts alone and left out;
- ``shipped.py``: sweeps too long for a chapter, shipped in ``data/sweeps/``: read them, and check a
  chapter's live re-run of some of their cells against them;
- ``runtime.py``: how a worker is set up (one thread, Lightning quiet).
"""
from .ablation import ablation_configs, ablation_sweep, ablation_table
from .cells import (CLIP_SETTINGS, ROW_COLUMNS, Cell, cell_config, clip_settings, fold_rows, grid_cells,
                    setting_label, setting_overrides)
from .engine import ENGINES, CellStore, run_cells
from .fix_matrix import FIX_TABLE_COLUMNS, FixMatrix, fix_matrix, fix_table, subset_result
from .quick import AdamStepRecorder, adam_probe, adam_toy_steps, quick_config, quick_train
from .recommended import recommended_config, recommended_overrides, recommended_yaml
from .runtime import quiet_lightning
from .seeds import p_as_many_or_more, seed_rates, seed_sweep
from .shipped import ShippedMismatch, ShippedSweep, compare_to_shipped, load_shipped
from .specs import SweepSpec, load_spec, spec_cells, sweep_names
from .stability import (clip_sweep, clip_sweep_table, describe_stability, edge_table, needs_tuning_table,
                        stability_edge, stability_map, stability_pivot, summarize_clip_map)
from .sweeps import SweepResult, run_sweep

__all__ = [
    "ablation_configs", "ablation_sweep", "ablation_table",
    "CLIP_SETTINGS", "ROW_COLUMNS", "Cell", "cell_config", "clip_settings", "fold_rows", "grid_cells", "setting_label",
    "setting_overrides", "ENGINES", "CellStore", "run_cells", "FIX_TABLE_COLUMNS", "FixMatrix", "fix_matrix",
    "fix_table", "subset_result", "AdamStepRecorder", "adam_probe", "adam_toy_steps", "quick_config", "quick_train",
    "recommended_config", "recommended_overrides", "recommended_yaml", "quiet_lightning", "seed_rates", "p_as_many_or_more",
    "seed_sweep", "ShippedMismatch", "ShippedSweep", "compare_to_shipped", "load_shipped", "SweepSpec", "load_spec",
    "spec_cells", "sweep_names", "clip_sweep", "clip_sweep_table",
    "describe_stability", "edge_table", "needs_tuning_table", "stability_edge", "stability_map",
    "stability_pivot", "summarize_clip_map", "SweepResult", "run_sweep",
]
