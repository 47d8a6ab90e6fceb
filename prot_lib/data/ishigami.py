r"""The Ishigami benchmark: an analytic function with known Sobol' indices.

Function (Ishigami & Homma 1990), inputs x_i ~ U(-pi, pi) independent:

    f(x) = sin(x1) + a sin^2(x2) + b x3^4 sin(x1),     a = 7, b = 0.1

Analytic moments and variance decomposition (Saltelli et al. 2008, *Global
Sensitivity Analysis: The Primer*, sec. 4.9; Sobol' & Levitan 1999):

    E[f]  = a / 2                                           = 3.5
    V     = a^2/8 + b pi^4/5 + b^2 pi^8/18 + 1/2            = 13.8446...
    V1    = (1 + b pi^4/5)^2 / 2           (x1 alone)
    V2    = a^2 / 8                        (x2 alone)
    V3    = 0                              (x3 alone: E[f | x3] is constant)
    V13   = b^2 pi^8 (1/18 - 1/50) = 8 b^2 pi^8 / 225   (x1-x3 interaction)
    S_i   = V_i / V        first-order index of x_i
    ST1   = (V1 + V13)/V,  ST2 = V2/V,  ST3 = V13/V     total-order indices

giving S1 = 0.3139, S2 = 0.4424, S3 = 0, ST1 = 0.5576, ST2 = 0.4424, ST3 = 0.2437
(and S13 = 0.2437). Note: in :data:`ISHIGAMI_SOBOL`, "S2" is the *first-order* index
of x2, not a second-order index; the only non-zero second-order index is "S13".

The sequence form the models train on (a 3-step "process chain", one token per input):

    token t (t = 1, 2, 3) = [x_t, one-hot(t) over 3 steps]
    x: (N, 3, 4) float32,  feature names ["value", "step:1", "step:2", "step:3"]
    y: (N,) float32, the raw f(x) (not standardised: the write-up trains on raw
       targets; f lies in [-1 - b pi^4, 1 + a + b pi^4] = [-10.74, 17.74],
       mean 3.5, std 3.72)

Shipped file ``data/ishigami.csv``: columns sample_id, x1, x2, x3, y; N = 1000,
seed 0 (see :func:`generate_ishigami`).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import torch

from .base import DataError, SequenceData
from .tables import data_dir, read_table

__all__ = [
    "ishigami",
    "ishigami_moments",
    "ishigami_sobol",
    "ISHIGAMI_A",
    "ISHIGAMI_B",
    "ISHIGAMI_MEAN",
    "ISHIGAMI_VARIANCE",
    "ISHIGAMI_SOBOL",
    "ISHIGAMI_FILE",
    "ISHIGAMI_SCHEMA",
    "ishigami_table",
    "ishigami_sequences",
    "generate_ishigami",
    "load_ishigami",
    "sobol_indices_salib",
]

ISHIGAMI_A = 7.0
ISHIGAMI_B = 0.1
ISHIGAMI_FILE = "ishigami.csv"
ISHIGAMI_SCHEMA = {"sample_id": "int", "x1": "float", "x2": "float", "x3": "float", "y": "float"}
INPUT_NAMES = ["x1", "x2", "x3"]
FEATURE_NAMES = ["value", "step:1", "step:2", "step:3"]


def ishigami(x, a: float = ISHIGAMI_A, b: float = ISHIGAMI_B):
    """f(x) = sin x1 + a sin^2 x2 + b x3^4 sin x1, row by row.

    Args:
        x: (N, 3) numpy array or torch tensor, inputs in radians (nominally in [-pi, pi]).
        a, b: the Ishigami constants (defaults 7 and 0.1, as in SALib and the Primer).

    Returns (N,) of the same type and dtype. Same values as
    ``SALib.test_functions.Ishigami.evaluate`` (checked in tests/test_data.py).
    Raises ValueError: x is not (N, 3).
    """
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"ishigami expects x of shape (N, 3), got {tuple(x.shape)}")
    lib = torch if isinstance(x, torch.Tensor) else np
    x1, x2, x3 = x[:, 0], x[:, 1], x[:, 2]
    return lib.sin(x1) + a * lib.sin(x2) ** 2 + b * x3**4 * lib.sin(x1)


def ishigami_moments(a: float = ISHIGAMI_A, b: float = ISHIGAMI_B) -> tuple[float, float]:
    """Analytic (mean, variance) of f for x ~ U(-pi, pi)^3 (formulas in the module docstring)."""
    pi = math.pi
    mean = a / 2.0
    variance = a**2 / 8.0 + b * pi**4 / 5.0 + b**2 * pi**8 / 18.0 + 0.5
    return mean, variance


def ishigami_sobol(a: float = ISHIGAMI_A, b: float = ISHIGAMI_B) -> dict[str, float]:
    """Analytic Sobol' indices {S1, S2, S3, ST1, ST2, ST3, S13} (module docstring)."""
    pi = math.pi
    _, v = ishigami_moments(a, b)
    v1 = 0.5 * (1.0 + b * pi**4 / 5.0) ** 2
    v2 = a**2 / 8.0
    v3 = 0.0
    v13 = b**2 * pi**8 * (1.0 / 18.0 - 1.0 / 50.0)
    return {
        "S1": v1 / v,
        "S2": v2 / v,
        "S3": v3 / v,
        "ST1": (v1 + v13) / v,
        "ST2": v2 / v,
        "ST3": (v3 + v13) / v,
        "S13": v13 / v,
    }


ISHIGAMI_MEAN, ISHIGAMI_VARIANCE = ishigami_moments()
ISHIGAMI_SOBOL = ishigami_sobol()


def ishigami_table(n: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The flat table written to ``data/ishigami.csv``.

    x ~ U(-pi, pi)^3 from ``numpy.random.default_rng(seed).uniform`` (one (n, 3) draw),
    y = ishigami(x). Columns: sample_id (0..n-1), x1, x2, x3 (rad), y (dimensionless),
    all float64.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-math.pi, math.pi, size=(n, 3))
    frame = pd.DataFrame(x, columns=INPUT_NAMES)
    frame.insert(0, "sample_id", np.arange(n, dtype=np.int64))
    frame["y"] = ishigami(x)
    return frame


def ishigami_sequences(frame: pd.DataFrame, source: str = "generated") -> SequenceData:
    """Flat table (sample_id, x1, x2, x3, y) -> SequenceData with x (N, 3, 4), y (N,).

    Token t = [x_t, one-hot(t)], see the module docstring.
    """
    inputs = torch.tensor(frame[INPUT_NAMES].to_numpy(dtype=np.float64), dtype=torch.float32)  # (N, 3)
    n = inputs.shape[0]
    onehot = torch.eye(3, dtype=torch.float32).expand(n, 3, 3)  # (N, 3 tokens, 3 steps)
    x = torch.cat([inputs.unsqueeze(-1), onehot], dim=-1)  # (N, 3, 4)
    y = torch.tensor(frame["y"].to_numpy(dtype=np.float64), dtype=torch.float32)
    meta = {
        "description": "Ishigami-Homma function, x ~ U(-pi, pi)^3, one token per input",
        "synthetic": True,
        "source": source,
        "a": ISHIGAMI_A,
        "b": ISHIGAMI_B,
        "row_ids": frame["sample_id"].tolist(),
        "feature_roles": {"value": "value", "step:1": "onehot", "step:2": "onehot", "step:3": "onehot"},
        "token_groups": list(INPUT_NAMES),
        "token_names": list(INPUT_NAMES),
        "nullable_features": [],
        "units": {"value": "rad"},
        "target": "y",
        "target_unit": "dimensionless",
    }
    return SequenceData(name="ishigami", x=x, y=y, feature_names=list(FEATURE_NAMES), meta=meta)


def generate_ishigami(n: int = 1000, seed: int = 0) -> SequenceData:
    """Sample the Ishigami benchmark: x ~ U(-pi, pi)^3, y = f(x).

    Returns SequenceData "ishigami": x (n, 3, 4) float32, y (n,) float32, no NaN.
    ``generate_ishigami()`` equals ``load_ishigami()`` of the shipped file.
    """
    return ishigami_sequences(ishigami_table(n, seed))


def load_ishigami(path: str | os.PathLike | None = None) -> SequenceData:
    """Read and validate ``ishigami.csv`` (default: ``data_dir() / "ishigami.csv"``).

    Returns SequenceData "ishigami": x (N, 3, 4), y (N,), float32.
    Raises DataError: missing file, wrong columns, a non-numeric or empty cell (names
    file, line and column), a duplicated sample_id.
    """
    path = data_dir() / ISHIGAMI_FILE if path is None else path
    frame = read_table(path, ISHIGAMI_SCHEMA)
    duplicated = frame["sample_id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(
            f"{path}: line {row + 2}, column 'sample_id': duplicated sample_id {frame['sample_id'][row]}"
        )
    return ishigami_sequences(frame, source=str(path))


def sobol_indices_salib(n: int = 4096, seed: int = 0, a: float = ISHIGAMI_A, b: float = ISHIGAMI_B) -> dict:
    """Estimate the Sobol' indices with SALib (Saltelli sampling + Sobol' analysis).

    Samples with ``SALib.sample.sobol.sample`` (scrambled Sobol' sequence, Saltelli's
    scheme, second order on: n * (2*3 + 2) model runs), evaluates :func:`ishigami`
    and estimates with ``SALib.analyze.sobol.analyze``.

    Returns {S1, S2, S3, ST1, ST2, ST3, S13} like :data:`ISHIGAMI_SOBOL`, plus
    "<key>_conf" (95 % bootstrap half-width) for each. With n = 4096 the estimates are
    typically within 0.02 of the analytic values. n should be a power of 2.
    """
    from SALib.analyze import sobol as sobol_analyze
    from SALib.sample import sobol as sobol_sample

    problem = {"num_vars": 3, "names": list(INPUT_NAMES), "bounds": [[-math.pi, math.pi]] * 3}
    inputs = sobol_sample.sample(problem, n, calc_second_order=True, seed=seed)
    outputs = ishigami(inputs, a, b)
    # SALib treats seed=0 as "no seed" (falls back to the global RNG), hence + 1.
    si = sobol_analyze.analyze(problem, outputs, calc_second_order=True, seed=seed + 1)
    result = {}
    for i in range(3):
        result[f"S{i + 1}"] = float(si["S1"][i])
        result[f"S{i + 1}_conf"] = float(si["S1_conf"][i])
        result[f"ST{i + 1}"] = float(si["ST"][i])
        result[f"ST{i + 1}_conf"] = float(si["ST_conf"][i])
    result["S13"] = float(si["S2"][0, 2])
    result["S13_conf"] = float(si["S2_conf"][0, 2])
    return result
