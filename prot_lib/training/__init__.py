"""Training: config (YAML -> validated objects), the Lightning module, k-fold runs."""
from .config import (ALL_FIXES, FIXES, ConfigError, RunConfig, config_from_dict, fix_overlay, load_config,
                     named_config, reproduction_config)
from .history import HistoryRecorder, params_all_finite
from .kfold import KFoldResult, fold_indices, run_kfold, train_fold
from .module import NaNStudyModule, total_grad_norm

__all__ = [
    "ALL_FIXES", "FIXES", "ConfigError", "RunConfig", "config_from_dict", "fix_overlay", "load_config",
    "named_config", "reproduction_config", "HistoryRecorder", "params_all_finite", "KFoldResult",
    "fold_indices", "run_kfold", "train_fold", "NaNStudyModule", "total_grad_norm",
]
