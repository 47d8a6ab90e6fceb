"""A SYNTHETIC stand-in for the Dyconex PCB process-chain data.

The write-up this project teaches from saw a NaN loss *at once* on Dyconex, a
proprietary dataset of printed-circuit-board (PCB) process chains. That data cannot be
shipped, so this module generates synthetic chains instead. Nothing here is measured:
the process steps are generic PCB steps, the numbers are invented to be plausible, and
``meta["synthetic"] = True`` on every object made from them. What the stand-in keeps are
the traits of such data that matter for the failure:

* values on very different scales in one input column: temperatures ~1e1-1e2 degC,
  pressures ~1e5-1e6 Pa, durations ~1e2-1e4 s;
* raw Unix timestamps (~1.7e9 s) as an input feature;
* missing values: ~5 % of the inputs (a sensor down for one step, a pressure sensor
  absent for a whole chain, single dropouts) and ~2 % of the targets.

Each chain runs the same route of 6 steps (step s runs process id s):

    step/process id  1 lamination   2 drilling   3 desmear
                     4 copper_plating   5 etching   6 solder_mask

and each step records 3 variables:

    variable id  1 temperature (degC)   2 pressure (Pa)   3 duration (s)

Long format (one token per (step, variable) measurement, as a process-chain
transformer consumes it), tokens ordered step-major (token = (step-1)*3 + variable-1):

    token features = [value (raw, own unit), timestamp (raw Unix s, step start),
                      one-hot process id (6), one-hot variable id (3)]
    x: (N, 18, 11) float32, NaN in "value" where the measurement is missing
    y: (N,) float32, copper thickness deviation from nominal in micrometres, NaN
       where the chain was not measured

Generation (``generate_dyconex``; numpy Generator PCG64 with the given seed):
each variable is ``nominal * exp(cv * z)`` with z ~ N(0, 1) per chain, step and
variable (log-normal spread around a per-step nominal, see ``NOMINAL`` and
``SPREAD``); steps follow each other with an exponential queue time (mean 2 h; 1.5 h
before plating); chains start uniformly in 2024. The target is

    y = 3 + 2.0 z_plating_duration + 1.0 tanh(2 z_plating_temperature)
          - 1.2 z_etching_duration - 0.6 z_lamination_pressure^2
          - 0.8 log(1 + wait_before_plating_h) + 0.25 eps,      eps ~ N(0, 1)

so a model can learn it once the inputs are standardised (the z are the standardised
process variables; the wait is visible through the timestamps and durations). Values
are rounded like a logger would (0.1 degC, 1 Pa, 1 s, 1 nm for the target).

Shipped files: ``data/dyconex_standin_steps.csv`` (long format, one row per token)
and ``data/dyconex_standin_targets.csv`` (chain_id, target); 600 chains, seed 0.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pandas as pd
import torch

from .base import DataError, SequenceData
from .tables import data_dir, read_table

__all__ = [
    "PROCESSES",
    "VARIABLES",
    "UNITS",
    "NOMINAL",
    "SPREAD",
    "STEPS_FILE",
    "TARGETS_FILE",
    "STEPS_SCHEMA",
    "TARGETS_SCHEMA",
    "dyconex_tables",
    "dyconex_sequences",
    "generate_dyconex",
    "load_dyconex",
]

PROCESSES = ["lamination", "drilling", "desmear", "copper_plating", "etching", "solder_mask"]
VARIABLES = ["temperature", "pressure", "duration"]
UNITS = {"temperature": "degC", "pressure": "Pa", "duration": "s"}

# Nominal set points, rows = PROCESSES, columns = VARIABLES (degC, Pa, s). Invented but
# plausible: a lamination press at ~24 bar and 185 degC, an atmospheric plating bath.
NOMINAL = np.array(
    [
        [185.0, 2.4e6, 5400.0],  # lamination
        [24.0, 6.0e5, 1500.0],  # drilling (pressure foot air)
        [78.0, 101325.0, 600.0],  # desmear (permanganate bath)
        [26.0, 101325.0, 4200.0],  # copper plating
        [48.0, 2.0e5, 150.0],  # etching (spray)
        [150.0, 101325.0, 3600.0],  # solder mask cure
    ]
)
# Log-normal spread (sigma of log value) per step and variable.
SPREAD = np.array(
    [
        [0.02, 0.06, 0.08],
        [0.05, 0.05, 0.20],
        [0.02, 0.005, 0.10],
        [0.04, 0.005, 0.15],
        [0.04, 0.08, 0.15],
        [0.02, 0.005, 0.10],
    ]
)
DECIMALS = np.array([1, 0, 0])  # logger resolution: 0.1 degC, 1 Pa, 1 s

QUEUE_MEAN_S = 2 * 3600.0  # mean wait between two steps
PLATING_QUEUE_MEAN_S = 1.5 * 3600.0  # mean wait desmear -> plating (enters the target)
START_RANGE_S = (1_704_067_200, 1_735_689_600)  # 2024-01-01 .. 2025-01-01 UTC
P_STEP_OUTAGE = 0.02  # logger down for a whole step: all 3 values missing
P_CHAIN_NO_PRESSURE = 0.03  # pressure sensor absent for a whole chain
P_DROPOUT = np.array([0.02, 0.03, 0.01])  # single missing value, per variable
P_TARGET_MISSING = 0.02  # exactly round(0.02 * n) chains, chosen at random

STEPS_FILE = "dyconex_standin_steps.csv"
TARGETS_FILE = "dyconex_standin_targets.csv"
STEPS_SCHEMA = {
    "chain_id": "int",
    "step": "int",
    "process_id": "int",
    "process_name": "str",
    "variable_id": "int",
    "variable_name": "str",
    "unit": "str",
    "value": "float?",
    "timestamp": "int",
}
TARGETS_SCHEMA = {"chain_id": "int", "target": "float?"}

N_STEPS, N_VARS = len(PROCESSES), len(VARIABLES)
FEATURE_NAMES = (
    ["value", "timestamp"] + [f"process:{p}" for p in PROCESSES] + [f"variable:{v}" for v in VARIABLES]
)


def dyconex_tables(n_chains: int = 600, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate the two flat tables written to the shipped CSV files.

    Returns (steps, targets):
        steps: n_chains * 18 rows, columns of ``STEPS_SCHEMA`` (value NaN = missing,
            timestamp = step start in integer Unix s);
        targets: n_chains rows, chain_id and target (um, NaN = not measured).
    Deterministic in (n_chains, seed).
    """
    rng = np.random.default_rng(seed)
    n, s, v = n_chains, N_STEPS, N_VARS
    # Draw order is fixed: changing it changes every shipped number.
    z = rng.standard_normal((n, s, v))
    start = rng.integers(*START_RANGE_S, size=n)
    queue_mean = np.full(s, QUEUE_MEAN_S)
    queue_mean[PROCESSES.index("copper_plating")] = PLATING_QUEUE_MEAN_S
    queue = np.round(rng.exponential(queue_mean, size=(n, s)))
    queue[:, 0] = 0.0
    eps = rng.standard_normal(n)
    step_outage = rng.random((n, s)) < P_STEP_OUTAGE
    no_pressure = rng.random(n) < P_CHAIN_NO_PRESSURE
    dropout = rng.random((n, s, v)) < P_DROPOUT
    target_missing = np.zeros(n, dtype=bool)
    target_missing[rng.choice(n, size=round(P_TARGET_MISSING * n), replace=False)] = True

    true = NOMINAL * np.exp(SPREAD * z)  # (n, s, v)
    for var, decimals in enumerate(DECIMALS):
        true[:, :, var] = np.round(true[:, :, var], decimals)
    durations = true[:, :, VARIABLES.index("duration")]
    # step k starts after step k-1 ended plus the queue time before step k
    offsets = np.cumsum(np.concatenate([np.zeros((n, 1)), durations[:, :-1]], axis=1) + queue, axis=1)
    timestamps = start[:, None] + offsets.astype(np.int64)  # (n, s) Unix s

    plating, etching, lamination = (PROCESSES.index(p) for p in ("copper_plating", "etching", "lamination"))
    t, p, d = (VARIABLES.index(x) for x in ("temperature", "pressure", "duration"))
    wait_before_plating_h = queue[:, plating] / 3600.0
    target = (
        3.0
        + 2.0 * z[:, plating, d]
        + 1.0 * np.tanh(2.0 * z[:, plating, t])
        - 1.2 * z[:, etching, d]
        - 0.6 * z[:, lamination, p] ** 2
        - 0.8 * np.log1p(wait_before_plating_h)
        + 0.25 * eps
    )
    target = np.round(target, 3)
    target[target_missing] = np.nan

    observed = true.copy()
    observed[step_outage] = np.nan
    observed[no_pressure, :, p] = np.nan
    observed[dropout] = np.nan

    chain = np.repeat(np.arange(n), s * v)
    step_idx = np.tile(np.repeat(np.arange(s), v), n)
    var_idx = np.tile(np.arange(v), n * s)
    steps = pd.DataFrame(
        {
            "chain_id": chain,
            "step": step_idx + 1,
            "process_id": step_idx + 1,
            "process_name": np.array(PROCESSES)[step_idx],
            "variable_id": var_idx + 1,
            "variable_name": np.array(VARIABLES)[var_idx],
            "unit": np.array([UNITS[x] for x in VARIABLES])[var_idx],
            "value": observed.reshape(-1),
            "timestamp": np.repeat(timestamps.reshape(-1), v),
        }
    )
    targets = pd.DataFrame({"chain_id": np.arange(n), "target": target})
    return steps, targets


def dyconex_sequences(steps: pd.DataFrame, targets: pd.DataFrame, source: str = "generated") -> SequenceData:
    """Long-format tables -> SequenceData with x (N, 18, 11), y (N,).

    ``steps`` must hold every (chain, step, variable) exactly once (the loader checks
    this); rows may come in any order. Token order is step-major.
    """
    steps = steps.sort_values(["chain_id", "step", "variable_id"], kind="stable")
    chain_ids = steps["chain_id"].to_numpy()[:: N_STEPS * N_VARS]
    n, length = len(chain_ids), N_STEPS * N_VARS
    value = steps["value"].to_numpy(dtype=np.float64).reshape(n, length)
    stamp = steps["timestamp"].to_numpy(dtype=np.float64).reshape(n, length)
    process_onehot = np.eye(N_STEPS)[steps["process_id"].to_numpy().reshape(n, length) - 1]
    variable_onehot = np.eye(N_VARS)[steps["variable_id"].to_numpy().reshape(n, length) - 1]
    x = np.concatenate([value[..., None], stamp[..., None], process_onehot, variable_onehot], axis=-1)
    y = targets.set_index("chain_id")["target"].reindex(chain_ids).to_numpy(dtype=np.float64)

    token_processes = [PROCESSES[i // N_VARS] for i in range(length)]
    token_variables = [VARIABLES[i % N_VARS] for i in range(length)]
    roles = {"value": "value", "timestamp": "timestamp"}
    roles.update({name: "onehot" for name in FEATURE_NAMES[2:]})
    meta = {
        "description": "SYNTHETIC stand-in for the proprietary Dyconex PCB process-chain data",
        "synthetic": True,
        "source": source,
        "row_ids": chain_ids.tolist(),
        "processes": list(PROCESSES),
        "variables": list(VARIABLES),
        "units": {"value": "per variable: " + ", ".join(f"{k} {u}" for k, u in UNITS.items()), "timestamp": "Unix s"},
        "feature_roles": roles,
        "token_groups": token_variables,  # standardise "value" per variable id
        "token_names": [f"{p}/{v}" for p, v in zip(token_processes, token_variables)],
        "nullable_features": ["value"],
        "target": "copper_thickness_deviation",
        "target_unit": "um",
    }
    return SequenceData(
        name="dyconex",
        x=torch.tensor(x, dtype=torch.float32),
        y=torch.tensor(y, dtype=torch.float32),
        feature_names=list(FEATURE_NAMES),
        meta=meta,
    )


def generate_dyconex(n_chains: int = 600, seed: int = 0) -> SequenceData:
    """Generate the synthetic Dyconex stand-in (module docstring) as SequenceData.

    Returns x (n_chains, 18, 11) float32 (raw units and Unix timestamps, ~5 % NaN in
    "value"), y (n_chains,) float32 in um (~2 % NaN); ``meta["synthetic"] = True``.
    ``generate_dyconex()`` equals ``load_dyconex()`` of the shipped files.
    """
    return dyconex_sequences(*dyconex_tables(n_chains, seed))


def _check_steps(steps: pd.DataFrame, path) -> None:
    """Ids known, names/units matching ids, every chain complete and without duplicates."""
    expected = {
        "step": range(1, N_STEPS + 1),
        "process_id": range(1, N_STEPS + 1),
        "variable_id": range(1, N_VARS + 1),
    }
    for column, allowed in expected.items():
        bad = ~steps[column].isin(list(allowed))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{path}: line {row + 2}, column '{column}': unknown {column} {steps[column][row]} "
                f"(expected {allowed.start}..{allowed.stop - 1})"
            )
    checks = [
        ("process_id", steps["process_id"] != steps["step"], "the route is fixed: step s runs process id s"),
        ("process_name", steps["process_name"] != np.array(PROCESSES)[steps["process_id"] - 1], "does not match process_id"),
        ("variable_name", steps["variable_name"] != np.array(VARIABLES)[steps["variable_id"] - 1], "does not match variable_id"),
        ("unit", steps["unit"] != np.array([UNITS[v] for v in VARIABLES])[steps["variable_id"] - 1], "does not match variable_id"),
    ]
    for column, bad, why in checks:
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}: line {row + 2}, column '{column}': {steps[column][row]!r} {why}")

    keys = steps[["chain_id", "step", "variable_id"]]
    duplicated = keys.duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        chain, step, var = keys.iloc[row]
        raise DataError(
            f"{path}: line {row + 2}: chain_id {chain} has a second row for step {step}, variable_id {var}"
        )
    counts = Counter(steps["chain_id"].tolist())
    for chain, count in counts.items():
        if count != N_STEPS * N_VARS:
            have = set(zip(*keys[steps["chain_id"] == chain][["step", "variable_id"]].to_numpy().T))
            lacking = [(s, v) for s in range(1, N_STEPS + 1) for v in range(1, N_VARS + 1) if (s, v) not in have]
            shown = ", ".join(f"step {s} variable_id {v}" for s, v in lacking[:5])
            raise DataError(
                f"{path}: chain_id {chain} has {count} rows, expected {N_STEPS * N_VARS} "
                f"({N_STEPS} steps x {N_VARS} variables); missing: {shown}"
            )


def _check_targets(targets: pd.DataFrame, chain_ids: set, targets_path, steps_path) -> None:
    duplicated = targets["chain_id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(
            f"{targets_path}: line {row + 2}, column 'chain_id': duplicated chain_id {targets['chain_id'][row]}"
        )
    in_targets = set(targets["chain_id"].tolist())
    if chain_ids - in_targets:
        chain = min(chain_ids - in_targets)
        raise DataError(f"{targets_path}: no target row for chain_id {chain} (it has steps in {steps_path})")
    if in_targets - chain_ids:
        chain = min(in_targets - chain_ids)
        row = int(np.flatnonzero((targets["chain_id"] == chain).to_numpy())[0])
        raise DataError(f"{targets_path}: line {row + 2}: chain_id {chain} has no steps in {steps_path}")


def load_dyconex(
    steps_path: str | os.PathLike | None = None, targets_path: str | os.PathLike | None = None
) -> SequenceData:
    """Read and validate the synthetic Dyconex stand-in files.

    Defaults: ``data_dir() / STEPS_FILE`` and ``data_dir() / TARGETS_FILE``.
    Returns SequenceData "dyconex": x (N, 18, 11), y (N,), float32, raw (see module).

    Raises DataError: a missing file (names the path and the regeneration command);
    a missing, extra or renamed column (names file and column); a non-numeric,
    non-integer, empty-where-not-allowed or infinite cell (names file, line, column);
    an unknown id or a name/unit that does not match its id (file, line, column); a
    chain with a missing or duplicated (step, variable) row (names file and chain_id);
    a chain without target or a target without chain (names file and chain_id).
    """
    folder = data_dir()
    steps_path = folder / STEPS_FILE if steps_path is None else steps_path
    targets_path = folder / TARGETS_FILE if targets_path is None else targets_path
    steps = read_table(steps_path, STEPS_SCHEMA)
    targets = read_table(targets_path, TARGETS_SCHEMA)
    _check_steps(steps, steps_path)
    _check_targets(targets, set(steps["chain_id"].tolist()), targets_path, steps_path)
    return dyconex_sequences(steps, targets, source=f"{steps_path}, {targets_path}")
