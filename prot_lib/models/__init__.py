"""The math: the S6 selective scan, the Mamba block, the two bidirectional topologies (the write-up's
directional stacks, a Vim-style residual stack) and the regressor built from a config by
:func:`build_model`.

The models reach the scan only through :func:`.selective_scan.selective_scan`, which chooses the
implementation by ``$PROT_LIB_SCAN`` (``auto``, the default: for CPU tensors the compiled numba
scan of :mod:`.numba_scan` where numba imports, else the pure-PyTorch chunked scan of
:mod:`.chunked_scan`; ``numba``: the compiled scan, an error without numba; ``torch``: always the
chunked scan; tensors on other devices always take the chunked scan). The Mamba block's causal
depthwise convolution follows the same choice (the kernels of :mod:`.numba_conv` or torch ops).
Both sets of kernels take their large tensors from :mod:`.buffer_pool` (``$PROT_LIB_BUFFER_POOL_MB``,
0 to switch it off).
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
