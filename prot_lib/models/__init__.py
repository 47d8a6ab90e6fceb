"""The math: the S6 selective scan, the Mamba block, the two bidirectional topologies (the write-up's
directional stacks, a Vim-style residual stack) and the regressor built from a config by
:func:`build_model`.

The fast chunked scan, when present, is reached only through :mod:`.selective_scan`, which falls
back to the unbind loop without it.
"""
from .bimamba import NORM_POSITIONS, TOPOLOGIES, BiMamba, BiMambaLayer, BiMambaStacks, S6Regressor
from .build import build_model
from .mamba import Mamba, MambaSSMUnavailableError, reinit_linear_biases
from .selective_scan import selective_scan, selective_scan_reference, selective_scan_unbind

__all__ = [
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_unbind",
    "Mamba",
    "MambaSSMUnavailableError",
    "reinit_linear_biases",
    "BiMamba",
    "BiMambaLayer",
    "BiMambaStacks",
    "S6Regressor",
    "TOPOLOGIES",
    "NORM_POSITIONS",
    "build_model",
]
