"""Training: config (YAML -> validated objects), the Lightning module, its safety nets, k-fold runs."""
from .checkpoint import load_checkpoint
from .config import (ALL_FIXES, FIXES, ConfigError, RunConfig, config_from_dict, fix_overlay, load_config,
                     named_config, reproduction_config, topology_overrides)
from .history import HistoryRecorder, params_all_finite
from .kfold import KFoldResult, fold_indices, fold_start, run_kfold, train_fold
from .module import NaNStudyModule, RawTrainingLoss, parameter_groups, total_grad_norm
from .safety_nets import SafetyNets, safety_nets
from .snapshots import module_loss_fn, snapshot_module, trace_snapshot

__all__ = [
    "ALL_FIXES", "FIXES", "ConfigError", "RunConfig", "config_from_dict", "fix_overlay", "load_config",
    "named_config", "reproduction_config", "topology_overrides", "HistoryRecorder", "params_all_finite", "KFoldResult",
    "fold_indices", "fold_start", "run_kfold", "train_fold", "NaNStudyModule", "RawTrainingLoss", "parameter_groups",
    "total_grad_norm", "SafetyNets", "safety_nets", "load_checkpoint", "module_loss_fn", "snapshot_module",
    "trace_snapshot",
]
