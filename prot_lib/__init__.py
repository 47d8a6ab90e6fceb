"""prot_lib: how NaN losses arise when training Mamba (S6) models with PyTorch Lightning, and how to fix them.

Folders name the parts: ``utils`` (atomic writes, batch copies), ``data`` (what goes in), ``models``
(the S6 math), ``diagnostics`` (finding where a NaN was born, a block's scale map), ``callbacks`` (the
safety nets, for any LightningModule), ``training`` (config, Lightning module, k-fold), ``experiments``
(the book's sweeps on one engine), ``viz`` (plots, widgets), ``__main__`` (the CLI). Dependencies run
one way, in that order (``tests/test_layers.py``).
The most used names are importable from the top level lazily (``from prot_lib import run_kfold``).
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "S6Regressor": "models", "BiMamba": "models", "BiMambaStacks": "models", "Mamba": "models", "selective_scan": "models",
    "selective_scan_reference": "models",
    "load_dataset": "data", "SequenceData": "data", "DataError": "data",
    "RunConfig": "training", "ConfigError": "training", "load_config": "training", "named_config": "training",
    "reproduction_config": "training", "run_kfold": "training", "KFoldResult": "training",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'prot_lib' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
