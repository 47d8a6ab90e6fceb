"""A SYNTHETIC *long* Dyconex stand-in: process chains of 1023 tokens, the write-up's sequence length.

The write-up's own debug log ("NaN after forward layer 2", shape (batch 50, L 1023, d_model 100);
scipi1/proT ``proT/baseline/MAMBA_NAN_FIX_FINAL.md`` at e755f0c^) came from chains about 1023 tokens
long. The short stand-in (:mod:`prot_lib.data.dyconex`, 18 tokens) reproduces a NaN *at once* through
its raw Pa values, raw Unix timestamps and missing values, all of which break the very first block.
This stand-in isolates the other mechanism, the one their log shows: moderate inputs that a stack
of plain Mamba blocks amplifies layer by layer until a later layer overflows. So, on purpose:

* long chains: a multilayer (sequential build-up) PCB repeats one cycle of 11 process steps for
  each of ``n_cycles`` build-up layers, and logs 3 variables per step, so
  L = n_cycles * 11 * 3 = 1023 tokens for the default 31 cycles (99 for the CI variant's 3);
* values in the units an operator's screen shows: degC, bar, minutes (1e0-2e2), not Pa or s;
* no timestamps and no missing values (the short stand-in covers those causes).

Nothing here is measured: the steps are a generic build-up route, the set points and spreads are
invented to be plausible, and ``meta["synthetic"] = True``. Every number comes from
``numpy.random.default_rng(seed)`` (PCG64) at load time; nothing is shipped except the SHA-256 of
the generated arrays (``data/dyconex_long_standin.sha256``), which ``python -m prot_lib.data.generate``
rewrites and tests/test_data.py checks, as it checks the regenerated CSV files of the other data.

Per chain, cycle c = 1..n_cycles, process step p (:data:`PROCESSES`), variable v (:data:`VARIABLES`):

    value = NOMINAL[p, v] * exp(SPREAD[p, v] * z[c, p, v]),  z ~ N(0, 1)
    rounded to 0.1 degC, 0.01 bar, 0.1 min

    token t = ((c - 1) * 11 + p) * 3 + v,  features [value, one-hot process (11), one-hot variable (3)]
    x: (N, L, 15) float32, no NaN;  y: (N,) float32

and the target (a final copper thickness deviation, um) reads both ends of the chain, so each
direction of a bidirectional model has something to carry across the whole sequence:

    y = 3 + 2.0 mean_c z[c, plating, duration] + tanh(2 z[last, plating, temperature])
          - 1.2 z[last, etching, duration] - 0.6 z[first, lamination, pressure]^2 + 0.25 eps
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .base import DataError, SequenceData
from .tables import data_dir, regenerate_hint

__all__ = [
    "PROCESSES",
    "VARIABLES",
    "UNITS",
    "NOMINAL",
    "SPREAD",
    "VARIANTS",
    "CHECKSUM_FILE",
    "generate_dyconex_long",
    "load_dyconex_long",
    "fingerprint",
    "read_checksums",
    "write_checksums",
]

PROCESSES = ["lamination", "drilling", "desmear", "electroless_copper", "copper_plating", "imaging",
             "etching", "stripping", "inspection", "oxide", "baking"]
VARIABLES = ["temperature", "pressure", "duration"]
UNITS = {"temperature": "degC", "pressure": "bar", "duration": "min"}

# Set points (degC, bar, min), rows = PROCESSES. Invented but plausible for one build-up cycle.
NOMINAL = np.array(
    [
        [185.0, 24.0, 90.0],   # lamination press
        [24.0, 6.0, 25.0],     # drilling (pressure-foot air)
        [78.0, 1.013, 10.0],   # desmear (permanganate bath)
        [32.0, 1.013, 20.0],   # electroless copper
        [26.0, 1.013, 70.0],   # copper plating
        [22.0, 0.8, 3.0],      # imaging (vacuum frame)
        [48.0, 2.0, 2.5],      # etching (spray)
        [50.0, 1.5, 2.0],      # resist stripping
        [22.0, 1.013, 5.0],    # optical inspection
        [40.0, 1.013, 6.0],    # oxide (bond) treatment
        [150.0, 1.013, 60.0],  # baking
    ]
)
# sigma of log(value) per step and variable
SPREAD = np.array(
    [
        [0.02, 0.06, 0.08],
        [0.05, 0.05, 0.20],
        [0.02, 0.005, 0.10],
        [0.03, 0.005, 0.10],
        [0.04, 0.005, 0.15],
        [0.03, 0.05, 0.10],
        [0.04, 0.08, 0.15],
        [0.04, 0.05, 0.10],
        [0.03, 0.005, 0.20],
        [0.03, 0.005, 0.10],
        [0.02, 0.005, 0.10],
    ]
)
DECIMALS = np.array([1, 2, 1])  # 0.1 degC, 0.01 bar, 0.1 min

#: the registered sizes: {dataset name: (n_chains, n_cycles, seed)}
VARIANTS = {
    "dyconex_long": (250, 31, 0),    # L = 1023, the write-up's length; 250 chains = 5 batches of 50
    "dyconex_long_ci": (100, 3, 0),  # L = 99: the same mechanism in seconds
}
CHECKSUM_FILE = "dyconex_long_standin.sha256"
N_PROC, N_VARS = len(PROCESSES), len(VARIABLES)
FEATURE_NAMES = ["value"] + [f"process:{p}" for p in PROCESSES] + [f"variable:{v}" for v in VARIABLES]


def generate_dyconex_long(n_chains: int = 250, n_cycles: int = 31, seed: int = 0,
                          name: str = "dyconex_long") -> SequenceData:
    """Generate the long stand-in (module docstring).

    Args:
        n_chains: N, number of chains (rows).
        n_cycles: build-up cycles per chain; L = n_cycles * 33 tokens.
        seed: seed of ``numpy.random.default_rng``.
        name: the dataset name recorded in the result.

    Returns:
        SequenceData: x (N, L, 15) float32 (raw degC / bar / min values, one-hots), y (N,) float32 in
        um; no NaN; ``meta["synthetic"] = True``. Deterministic in (n_chains, n_cycles, seed).

    Raises:
        ValueError: n_chains or n_cycles < 1.
    """
    if n_chains < 1 or n_cycles < 1:
        raise ValueError(f"n_chains and n_cycles must be >= 1, got {n_chains}, {n_cycles}")
    rng = np.random.default_rng(seed)
    n, c = n_chains, n_cycles
    z = rng.standard_normal((n, c, N_PROC, N_VARS))  # draw order fixed: it defines every number
    eps = rng.standard_normal(n)
    values = NOMINAL * np.exp(SPREAD * z)
    for v, decimals in enumerate(DECIMALS):
        values[..., v] = np.round(values[..., v], decimals)

    plating, etching, lamination = (PROCESSES.index(p) for p in ("copper_plating", "etching", "lamination"))
    t, p, d = range(N_VARS)
    y = (3.0 + 2.0 * z[:, :, plating, d].mean(axis=1) + np.tanh(2.0 * z[:, -1, plating, t])
         - 1.2 * z[:, -1, etching, d] - 0.6 * z[:, 0, lamination, p] ** 2 + 0.25 * eps)
    y = np.round(y, 3)

    length = c * N_PROC * N_VARS
    proc_idx = np.tile(np.repeat(np.arange(N_PROC), N_VARS), c)  # (L,)
    var_idx = np.tile(np.arange(N_VARS), c * N_PROC)
    onehots = np.concatenate([np.eye(N_PROC)[proc_idx], np.eye(N_VARS)[var_idx]], axis=-1)  # (L, 14)
    x = np.concatenate([values.reshape(n, length, 1), np.broadcast_to(onehots, (n, length, 14))], axis=-1)

    cycles = np.repeat(np.arange(1, c + 1), N_PROC * N_VARS)
    meta = {
        "description": "SYNTHETIC long stand-in for the proprietary Dyconex PCB process-chain data "
                       f"({c} build-up cycles x {N_PROC} steps x {N_VARS} variables = {length} tokens)",
        "synthetic": True,
        "source": f"generate_dyconex_long(n_chains={n}, n_cycles={c}, seed={seed})",
        "row_ids": list(range(n)),
        "processes": list(PROCESSES),
        "variables": list(VARIABLES),
        "units": {"value": "per variable: " + ", ".join(f"{k} {u}" for k, u in UNITS.items())},
        "feature_roles": {"value": "value", **{f: "onehot" for f in FEATURE_NAMES[1:]}},
        "token_groups": [VARIABLES[i] for i in var_idx],  # standardise "value" per variable
        "token_names": [f"c{cy}/{PROCESSES[pi]}/{VARIABLES[vi]}" for cy, pi, vi in zip(cycles, proc_idx, var_idx)],
        "nullable_features": [],
        "target": "copper_thickness_deviation",
        "target_unit": "um",
    }
    return SequenceData(name=name, x=torch.tensor(x, dtype=torch.float32),
                        y=torch.tensor(y, dtype=torch.float32), feature_names=list(FEATURE_NAMES), meta=meta)


def fingerprint(data: SequenceData) -> str:
    """SHA-256 (hex) of ``x`` and ``y``'s float32 bytes (little-endian, C order) and their shapes."""
    h = hashlib.sha256()
    for t in (data.x, data.y):
        a = np.ascontiguousarray(t.numpy().astype("<f4"))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_checksums(path: str | Path | None = None) -> dict:
    """{dataset name: sha256} from the shipped checksum file (``data/dyconex_long_standin.sha256``,
    lines ``<sha256>  <name>``).

    Raises:
        DataError: the file is missing (names it and the regeneration command) or a line is malformed
            (names the file and the line).
    """
    path = data_dir() / CHECKSUM_FILE if path is None else Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; {regenerate_hint(path.parent)}")
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{path}: line {i}: expected '<sha256>  <name>', got {line!r}")
        out[parts[1]] = parts[0]
    return out


def write_checksums(out: str | Path) -> Path:
    """Generate every variant of :data:`VARIANTS` and write their fingerprints to ``out/CHECKSUM_FILE``
    (byte-reproducible: sorted by name, "\\n" line ends)."""
    path = Path(out) / CHECKSUM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{fingerprint(load_dyconex_long(name))}  {name}" for name in sorted(VARIANTS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def load_dyconex_long(name: str = "dyconex_long") -> SequenceData:
    """The registered variant ``name`` of :data:`VARIANTS`, generated (about 0.1-0.5 s).

    Raises:
        DataError: unknown variant (lists the valid names).
    """
    if name not in VARIANTS:
        raise DataError(f"unknown long stand-in {name!r}; valid: {', '.join(VARIANTS)}")
    n_chains, n_cycles, seed = VARIANTS[name]
    return generate_dyconex_long(n_chains, n_cycles, seed, name=name)
