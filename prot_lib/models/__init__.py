"""The math: the S6 selective scan, the Mamba block, and the bidirectional stack and regressor.

The fast chunked scan, when present, is reached only through :mod:`.selective_scan`, which falls
back to the unbind loop without it.
"""
from .bimamba import BiMamba, BiMambaLayer, S6Regressor
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
    "S6Regressor",
]
