"""prot_lib.data: the Ishigami benchmark, the synthetic Dyconex stand-in, the shipped
files, the loaders' error messages and the train-only normalisation.

Every assertion checks a number a reader can recompute (an index, a scale, a fraction,
a line number in an error message). Runs in a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from SALib.test_functions import Ishigami

import prot_lib
from prot_lib.data import (
    ISHIGAMI_MEAN,
    ISHIGAMI_SOBOL,
    ISHIGAMI_VARIANCE,
    DataError,
    SequenceData,
    generate_dyconex,
    generate_ishigami,
    ishigami,
    load_dataset,
    load_dyconex,
    load_ishigami,
    sobol_indices_salib,
)
from prot_lib.data import dyconex_long
from prot_lib.data.dyconex import PROCESSES, STEPS_FILE, TARGETS_FILE, VARIABLES
from prot_lib.data.ishigami import ISHIGAMI_FILE

SHIPPED = Path(prot_lib.__file__).resolve().parents[1] / "data"
REPO = SHIPPED.parent
FILES = [ISHIGAMI_FILE, STEPS_FILE, TARGETS_FILE]


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.fixture(scope="module")
def dyconex() -> SequenceData:
    return load_dataset("dyconex")


@pytest.fixture
def copies(tmp_path: Path) -> Path:
    """A writable copy of the shipped files, to break one at a time."""
    for name in FILES:
        shutil.copy(SHIPPED / name, tmp_path / name)
    return tmp_path


def edit_line(path: Path, line: int, edit) -> None:
    """Apply ``edit(fields) -> fields`` to 1-based ``line`` of a CSV file."""
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = ",".join(edit(lines[line - 1].rstrip("\n").split(","))) + "\n"
    path.write_text("".join(lines))


def column_index(path: Path, column: str) -> int:
    return path.read_text().splitlines()[0].split(",").index(column)


# --------------------------------------------------------------------------- Ishigami


def test_ishigami_equals_salib_reference():
    x = np.random.default_rng(7).uniform(-math.pi, math.pi, size=(500, 3))
    np.testing.assert_allclose(ishigami(x), Ishigami.evaluate(x), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(ishigami(x, a=5.0, b=0.2), Ishigami.evaluate(x, A=5.0, B=0.2), rtol=1e-13, atol=1e-13)
    y_torch = ishigami(torch.from_numpy(x))
    assert isinstance(y_torch, torch.Tensor) and y_torch.dtype == torch.float64
    np.testing.assert_allclose(y_torch.numpy(), Ishigami.evaluate(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        ishigami(np.zeros((4, 2)))


def test_analytic_mean_and_variance_match_monte_carlo():
    # Tolerance: 5 standard errors of the estimator. SE(mean) = s / sqrt(n);
    # SE(variance) = sqrt((m4 - s^4) / n) with m4 the 4th central moment (heavy-ish
    # tail from b x3^4). At n = 1e6: SE(mean) ~ 0.0037, SE(var) ~ 0.018.
    n = 1_000_000
    y = ishigami(np.random.default_rng(2024).uniform(-math.pi, math.pi, size=(n, 3)))
    mean, var = y.mean(), y.var()
    m4 = ((y - mean) ** 4).mean()
    assert abs(mean - ISHIGAMI_MEAN) < 5 * math.sqrt(var / n)
    assert abs(var - ISHIGAMI_VARIANCE) < 5 * math.sqrt((m4 - var**2) / n)
    assert ISHIGAMI_MEAN == 3.5
    assert round(ISHIGAMI_VARIANCE, 4) == 13.8446


def test_analytic_sobol_indices():
    expected = {"S1": 0.3139, "S2": 0.4424, "S3": 0.0, "ST1": 0.5576, "ST2": 0.4424, "ST3": 0.2437}
    for key, value in expected.items():
        assert round(ISHIGAMI_SOBOL[key], 4) == value, key
    # the decomposition is complete: S1 + S2 + S3 + S13 = 1, and ST1 = S1 + S13
    s = ISHIGAMI_SOBOL
    assert s["S1"] + s["S2"] + s["S3"] + s["S13"] == pytest.approx(1.0, abs=1e-12)
    assert s["ST1"] == pytest.approx(s["S1"] + s["S13"], abs=1e-12)


def test_salib_estimate_agrees_with_analytic_indices():
    # Loose tolerance 0.05 absolute: at n = 4096 (32768 model runs) SALib's own 95 %
    # bootstrap half-widths are 0.01-0.04 for these indices.
    estimate = sobol_indices_salib(n=4096, seed=0)
    for key in ("S1", "S2", "S3", "ST1", "ST2", "ST3"):
        assert abs(estimate[key] - ISHIGAMI_SOBOL[key]) < 0.05, (key, estimate[key])


def test_ishigami_sequence_layout():
    data = generate_ishigami(n=50, seed=3)
    assert data.shape == (50, 3, 4) and data.x.dtype == torch.float32 and data.y.shape == (50,)
    assert data.feature_names == ["value", "step:1", "step:2", "step:3"]
    # token t = [x_t, one-hot(t)]
    assert torch.equal(data.x[:, :, 1:], torch.eye(3).expand(50, 3, 3))
    raw = np.random.default_rng(3).uniform(-math.pi, math.pi, size=(50, 3))
    assert torch.equal(data.x[:, :, 0], torch.tensor(raw, dtype=torch.float32))
    assert torch.equal(data.y, torch.tensor(ishigami(raw), dtype=torch.float32))  # raw, not standardised
    assert not torch.isnan(data.x).any() and not torch.isnan(data.y).any()


# --------------------------------------------------------------------------- Dyconex stand-in


def test_dyconex_is_deterministic_per_seed():
    a, b, c = generate_dyconex(60, seed=0), generate_dyconex(60, seed=0), generate_dyconex(60, seed=1)
    assert_identical(a.x, b.x)
    assert_identical(a.y, b.y)
    assert not torch.equal(torch.nan_to_num(a.x), torch.nan_to_num(c.x))


def test_dyconex_shape_layout_and_synthetic_label(dyconex):
    assert dyconex.shape == (600, 18, 11)
    assert dyconex.meta["synthetic"] is True and "SYNTHETIC" in dyconex.meta["description"]
    assert dyconex.feature_names[:2] == ["value", "timestamp"]
    process_onehot, variable_onehot = dyconex.x[0, :, 2:8], dyconex.x[0, :, 8:11]
    # step-major tokens: token k is (process k // 3, variable k % 3)
    assert process_onehot.argmax(-1).tolist() == [k // 3 for k in range(18)]
    assert variable_onehot.argmax(-1).tolist() == [k % 3 for k in range(18)]
    assert dyconex.meta["token_names"][10] == f"{PROCESSES[3]}/{VARIABLES[1]}"


def test_dyconex_keeps_the_raw_scales_that_break_training(dyconex):
    value, stamp = dyconex.x[..., 0], dyconex.x[..., 1]
    by_variable = {v: value[:, i::3] for i, v in enumerate(VARIABLES)}
    assert by_variable["pressure"].nanmedian().abs() > 1e4  # Pa
    assert 10 < by_variable["temperature"].nanmedian() < 300  # degC
    assert 1e2 < by_variable["duration"].nanmedian() < 1e4  # s
    assert stamp.min() > 1e9  # raw Unix seconds, ~1.7e9
    # within a chain timestamps never go backwards
    assert (stamp.diff(dim=1) >= 0).all()


def test_dyconex_missing_values(dyconex):
    value_nan = torch.isnan(dyconex.x[..., 0]).float().mean().item()
    assert 0.03 < value_nan < 0.07  # ~5 % of the measurements (4.7 % in the shipped file)
    assert not torch.isnan(dyconex.x[..., 1:]).any()  # only "value" may be missing
    assert torch.isnan(dyconex.y).sum().item() == 12  # exactly 2 % of 600 targets
    # a step outage: some (chain, step) have all three values missing
    per_step = torch.isnan(dyconex.x[..., 0]).reshape(600, 6, 3).all(-1)
    assert per_step.any()


def test_dyconex_generation_is_fast():
    import time

    start = time.perf_counter()
    generate_dyconex(600, seed=0)
    assert time.perf_counter() - start < 1.0


def test_dyconex_target_is_learnable_after_normalisation(dyconex):
    # A ridge regression on the normalised, flattened tokens explains most of the
    # variance on held-out chains (measured R^2 ~ 0.6; a boosted tree gets ~ 0.75):
    # the target is a learnable function of the inputs, not noise.
    order = np.random.default_rng(1).permutation(len(dyconex))
    train, test = order[:480], order[480:]
    data = dyconex.normalized(train)
    x = torch.cat([data.x.reshape(len(data), -1), torch.ones(len(data), 1)], dim=1).double()
    y = data.y.double()
    fit = train[~torch.isnan(y[train]).numpy()]
    ev = test[~torch.isnan(y[test]).numpy()]
    gram = x[fit].T @ x[fit] + 1.0 * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, x[fit].T @ y[fit])
    residual = y[ev] - x[ev] @ w
    r2 = 1 - residual.var() / y[ev].var()
    assert r2 > 0.4, float(r2)


# --------------------------------------------------------------------------- long Dyconex stand-in


@pytest.fixture(scope="module")
def long_ci() -> SequenceData:
    return load_dataset("dyconex_long_ci")


def test_long_standin_shape_layout_and_units(long_ci):
    full = load_dataset("dyconex_long")
    assert full.shape == (250, 1023, 15) and long_ci.shape == (100, 99, 15)  # L = cycles x 11 steps x 3
    for data in (full, long_ci):
        assert data.meta["synthetic"] is True and "SYNTHETIC" in data.meta["description"]
        assert not torch.isnan(data.x).any() and not torch.isnan(data.y).any()
    x = long_ci.x[0]
    L = 99
    # cycle-major, then step, then variable: token t is (process (t // 3) % 11, variable t % 3)
    assert x[:, 1:12].argmax(-1).tolist() == [(t // 3) % 11 for t in range(L)]
    assert x[:, 12:15].argmax(-1).tolist() == [t % 3 for t in range(L)]
    assert long_ci.meta["token_names"][34] == "c2/lamination/pressure"
    value = long_ci.x[..., 0]
    by_variable = {v: value[:, i::3] for i, v in enumerate(dyconex_long.VARIABLES)}
    assert 150 < by_variable["temperature"].max() < 250  # degC: the largest raw values, lamination
    assert 0.5 < by_variable["pressure"].min() and by_variable["pressure"].max() < 40  # bar
    assert 1 < by_variable["duration"].min() and by_variable["duration"].max() < 200  # min


def test_long_standin_target_is_its_formula(long_ci):
    # Undo the generation: z = log(value / nominal) / spread (rounding adds ~1e-3 in z), then the
    # documented target formula leaves only the 0.25 * eps noise (and the 0.001 um target rounding).
    n_proc, n_var = len(dyconex_long.PROCESSES), len(dyconex_long.VARIABLES)
    v = long_ci.x[..., 0].double().numpy().reshape(len(long_ci), -1, n_proc, n_var)
    z = np.log(v / dyconex_long.NOMINAL) / dyconex_long.SPREAD
    plating, etching, lamination = (dyconex_long.PROCESSES.index(p) for p in ("copper_plating", "etching", "lamination"))
    formula = (3.0 + 2.0 * z[:, :, plating, 2].mean(1) + np.tanh(2 * z[:, -1, plating, 0])
               - 1.2 * z[:, -1, etching, 2] - 0.6 * z[:, 0, lamination, 1] ** 2)
    residual = long_ci.y.double().numpy() - formula
    assert 0.18 < residual.std() < 0.32, residual.std()  # the documented 0.25 * eps
    assert abs(residual.mean()) < 0.08


def test_long_standin_regeneration_matches_the_shipped_checksums(tmp_path):
    shipped = dyconex_long.read_checksums()
    assert set(shipped) == set(dyconex_long.VARIANTS)
    for name in dyconex_long.VARIANTS:
        assert dyconex_long.fingerprint(dyconex_long.load_dyconex_long(name)) == shipped[name], name
    out = dyconex_long.write_checksums(tmp_path)
    assert out.read_bytes() == (SHIPPED / dyconex_long.CHECKSUM_FILE).read_bytes()
    a, b = dyconex_long.generate_dyconex_long(5, 2, seed=3), dyconex_long.generate_dyconex_long(5, 2, seed=4)
    assert not torch.equal(a.x, b.x)
    with pytest.raises(DataError, match="dyconex_long_ci"):
        dyconex_long.load_dyconex_long("dyconex_longer")
    (tmp_path / "bad.sha256").write_text("abc  dyconex_long\n")
    with pytest.raises(DataError, match="line 1"):
        dyconex_long.read_checksums(tmp_path / "bad.sha256")


def test_long_standin_normalizes_per_variable(long_ci):
    data = long_ci.normalized(np.arange(80))
    assert data.feature_names == long_ci.feature_names  # no NaN anywhere: no indicator feature added
    value = data.x[:80, :, 0]
    for i in range(3):
        col = value[:, i::3]
        assert abs(col.mean().item()) < 1e-4 and abs(col.std(unbiased=False).item() - 1) < 1e-3


# --------------------------------------------------------------------------- shipped files


def _ulps_apart(a: str, b: str) -> float:
    x, y = float(a), float(b)
    return abs(x - y) / np.spacing(abs(y)) if x != y else 0.0


def test_regeneration_reproduces_the_shipped_files(tmp_path):
    """Every cell is the same text, except that a float cell may differ in its last bits: sin() comes
    from the platform's math library (numpy 2.4 and 2.3 differ in up to 8 ulps on 8 of the 1000
    Ishigami targets). Such a cell must stay within 16 ulps, and the float32 tensors the models train
    on are identical (next test)."""
    # the documented command, as a reader would type it
    subprocess.run(
        [sys.executable, "-m", "prot_lib.data.generate", "--out", str(tmp_path)],
        check=True, cwd=REPO, capture_output=True, timeout=120,
    )
    for name in FILES:
        new = (tmp_path / name).read_text().splitlines()
        old = (SHIPPED / name).read_text().splitlines()
        assert len(new) == len(old), f"{name}: {len(new)} lines regenerated, {len(old)} shipped"
        header = old[0].split(",")
        assert new[0] == old[0], f"{name}: header differs"
        n_cells = n_off = 0
        for line_no, (a_line, b_line) in enumerate(zip(new[1:], old[1:]), start=2):
            for column, a, b in zip(header, a_line.split(","), b_line.split(",")):
                n_cells += 1
                if a == b:
                    continue
                n_off += 1
                ulps = _ulps_apart(a, b) if a and b else math.inf
                assert ulps <= 16, f"{name}: line {line_no}, column {column!r}: {a} regenerated, {b} shipped"
        assert n_off <= 0.01 * n_cells, f"{name}: {n_off} of {n_cells} cells differ in their last bits"


def test_shipped_files_equal_the_generators(dyconex):
    assert_identical(dyconex.x, generate_dyconex().x)
    assert_identical(dyconex.y, generate_dyconex().y)
    shipped = load_ishigami()
    assert_identical(shipped.x, generate_ishigami().x)
    assert_identical(shipped.y, generate_ishigami().y)
    assert shipped.shape == (1000, 3, 4)


def test_env_var_overrides_data_dir(copies, monkeypatch):
    edit_line(copies / ISHIGAMI_FILE, 2, lambda f: f[:4] + ["123.5"])  # y of sample 0
    monkeypatch.setenv("PROT_LIB_DATA", str(copies))
    assert load_dataset("ishigami").y[0].item() == 123.5
    assert load_ishigami().y[0].item() == 123.5


# --------------------------------------------------------------------------- loader errors


def test_missing_file_names_path_and_command(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("ishigami", data_dir=tmp_path)
    assert str(tmp_path / ISHIGAMI_FILE) in str(err.value)
    assert "python -m prot_lib.data.generate" in str(err.value)
    with pytest.raises(DataError, match=TARGETS_FILE):
        load_dyconex(SHIPPED / STEPS_FILE, tmp_path / TARGETS_FILE)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as err:
        load_dataset("mnist")
    assert "'mnist'" in str(err.value) and "'ishigami'" in str(err.value) and "'dyconex'" in str(err.value)


def test_dropped_column(copies):
    path = copies / STEPS_FILE
    drop = column_index(path, "unit")
    path.write_text("".join(",".join(l.split(",")[:drop] + l.split(",")[drop + 1:]) for l in path.read_text().splitlines(keepends=True)))
    with pytest.raises(DataError) as err:
        load_dataset("dyconex", data_dir=copies)
    assert STEPS_FILE in str(err.value) and "missing column(s) 'unit'" in str(err.value)


def test_renamed_and_extra_columns(copies):
    path = copies / ISHIGAMI_FILE
    edit_line(path, 1, lambda f: [("x_2" if c == "x2" else c) for c in f])
    with pytest.raises(DataError) as err:
        load_ishigami(path)
    message = str(err.value)
    assert ISHIGAMI_FILE in message and "missing column(s) 'x2'" in message and "unexpected column(s) 'x_2'" in message

    path = copies / TARGETS_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join(l + (",comment" if i == 0 else ",") for i, l in enumerate(lines)) + "\n")
    with pytest.raises(DataError, match=r"dyconex_standin_targets\.csv: unexpected column\(s\) 'comment'"):
        load_dataset("dyconex", data_dir=copies)


@pytest.mark.parametrize(
    "file, column, line",
    [(ISHIGAMI_FILE, "x3", 17), (STEPS_FILE, "value", 101), (STEPS_FILE, "timestamp", 5), (TARGETS_FILE, "target", 9)],
)
def test_non_numeric_cell_names_file_line_and_column(copies, file, column, line):
    path = copies / file
    col = column_index(path, column)
    edit_line(path, line, lambda f: f[:col] + ["abc"] + f[col + 1:])
    with pytest.raises(DataError) as err:
        load_dataset("ishigami" if file == ISHIGAMI_FILE else "dyconex", data_dir=copies)
    message = str(err.value)
    assert file in message and f"line {line}," in message and f"column '{column}'" in message and "'abc'" in message


def test_missing_value_only_where_declared(copies):
    # empty "value" cells are in the shipped file and load fine; an empty x1 or timestamp is an error
    assert (copies / STEPS_FILE).read_text().count(",,") > 0
    edit_line(copies / ISHIGAMI_FILE, 4, lambda f: [f[0], ""] + f[2:])
    with pytest.raises(DataError, match=r"ishigami\.csv: line 4, column 'x1': missing value"):
        load_dataset("ishigami", data_dir=copies)
    edit_line(copies / STEPS_FILE, 3, lambda f: f[:-1] + [""])
    with pytest.raises(DataError, match=r"dyconex_standin_steps\.csv: line 3, column 'timestamp'"):
        load_dataset("dyconex", data_dir=copies)


def test_infinite_value_is_rejected(copies):
    edit_line(copies / TARGETS_FILE, 2, lambda f: [f[0], "inf"])
    with pytest.raises(DataError, match=r"line 2, column 'target': non-finite"):
        load_dataset("dyconex", data_dir=copies)


def test_missing_step_row_names_the_chain(copies):
    path = copies / STEPS_FILE
    lines = path.read_text().splitlines(keepends=True)
    # chain 7's rows are lines 2 + 7*18 .. ; drop its step 4 / pressure row
    victim = 1 + 7 * 18 + 3 * 3 + 1
    assert lines[victim].startswith("7,4,4,copper_plating,2,pressure,")
    path.write_text("".join(lines[:victim] + lines[victim + 1:]))
    with pytest.raises(DataError) as err:
        load_dataset("dyconex", data_dir=copies)
    message = str(err.value)
    assert STEPS_FILE in message and "chain_id 7 has 17 rows" in message and "step 4 variable_id 2" in message


def test_duplicated_row_and_missing_target_name_the_chain(copies):
    path = copies / STEPS_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3] + [lines[2]] + lines[3:]))
    with pytest.raises(DataError, match=r"line 4: chain_id 0 has a second row for step 1, variable_id 2"):
        load_dataset("dyconex", data_dir=copies)

    shutil.copy(SHIPPED / STEPS_FILE, path)
    targets = copies / TARGETS_FILE
    lines = targets.read_text().splitlines(keepends=True)
    targets.write_text("".join(lines[:6] + lines[7:]))  # drop chain 5
    with pytest.raises(DataError, match=r"dyconex_standin_targets\.csv: no target row for chain_id 5"):
        load_dataset("dyconex", data_dir=copies)


def test_name_that_does_not_match_its_id(copies):
    edit_line(copies / STEPS_FILE, 2, lambda f: f[:3] + ["drilling"] + f[4:])
    with pytest.raises(DataError, match=r"line 2, column 'process_name': 'drilling' does not match process_id"):
        load_dataset("dyconex", data_dir=copies)


# --------------------------------------------------------------------------- SequenceData


def test_subset_follows_rows(dyconex):
    part = dyconex.subset([5, 2, 9])
    assert len(part) == 3 and part.meta["row_ids"] == [5, 2, 9]
    assert_identical(part.x[1], dyconex.x[2])
    mask = torch.zeros(600, dtype=torch.bool)
    mask[[1, 3]] = True
    assert dyconex.subset(mask).meta["row_ids"] == [1, 3]
    assert len(dyconex.subset(slice(0, 10))) == 10


def test_container_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="float32"):
        SequenceData("bad", torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2), ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="feature names"):
        SequenceData("bad", torch.zeros(2, 3, 4), torch.zeros(2), ["a"])
    with pytest.raises(ValueError, match="y must be"):
        SequenceData("bad", torch.zeros(2, 3, 4), torch.zeros(3), ["a", "b", "c", "d"])


TRAIN = np.arange(0, 600, 5).tolist() + np.arange(1, 600, 5).tolist() + np.arange(2, 600, 5).tolist()


def test_normalized_has_no_nan_and_documented_features(dyconex):
    data = dyconex.normalized(TRAIN)
    assert data.shape == (600, 18, 12)
    assert data.feature_names == ["value", "timestamp_h"] + dyconex.feature_names[2:] + ["value_missing"]
    assert not torch.isnan(data.x).any()
    assert_identical(data.y, dyconex.y)  # NaN labels stay: the loss masks them
    assert torch.equal(data.x[..., 2:11], dyconex.x[..., 2:11])  # one-hots untouched
    assert data.meta["synthetic"] is True and data.meta["normalization"]["train_rows"] == len(TRAIN)


def test_normalized_statistics_on_training_rows(dyconex):
    data = dyconex.normalized(TRAIN)
    raw_missing = torch.isnan(dyconex.x[TRAIN, :, 0])
    value = data.x[TRAIN, :, 0]
    for i, variable in enumerate(VARIABLES):  # one (mean, std) per variable id
        present = value[:, i::3][~raw_missing[:, i::3]].double()
        assert abs(present.mean().item()) < 1e-5, variable
        assert abs(present.std(correction=0).item() - 1) < 1e-4, variable
    hours = data.x[TRAIN, :, 1].double()
    assert abs(hours.mean().item()) < 1e-5 and abs(hours.std(correction=0).item() - 1) < 1e-4
    # indicator: 1 exactly where the raw value was NaN, and the value itself is 0 there
    assert torch.equal(data.x[..., -1], torch.isnan(dyconex.x[..., 0]).float())
    assert (data.x[..., 0][torch.isnan(dyconex.x[..., 0])] == 0).all()


def test_timestamps_become_hours_since_the_chain_start(dyconex):
    data = dyconex.normalized(TRAIN)
    stats = data.meta["normalization"]["timestamp_h"]
    hours = data.x[..., 1].double() * stats["std_h"] + stats["mean_h"]
    raw = dyconex.x[..., 1].double()
    expected = (raw - raw[:, :1]) / 3600
    assert (hours[:, 0].abs() < 1e-4).all()  # the first step is hour 0
    torch.testing.assert_close(hours, expected, rtol=0, atol=1e-4)


def test_normalisation_statistics_come_from_train_rows_only(dyconex):
    changed_x = dyconex.x.clone()
    test_row = 4  # not in TRAIN
    assert test_row not in TRAIN
    changed_x[test_row, :, 0] *= 1000.0
    changed_x[test_row, :, 1] += 3.0e8
    changed = SequenceData("dyconex", changed_x, dyconex.y.clone(), list(dyconex.feature_names), dict(dyconex.meta))
    before, after = dyconex.normalized(TRAIN), changed.normalized(TRAIN)
    assert torch.equal(before.x[TRAIN], after.x[TRAIN])
    # fitting on all rows instead *would* move the training rows
    assert not torch.equal(dyconex.normalized(slice(None)).x[TRAIN], changed.normalized(slice(None)).x[TRAIN])


def test_normalized_ishigami_has_no_indicator_and_unit_scale():
    data = generate_ishigami(400, seed=1)
    out = data.normalized(range(300))
    assert out.feature_names == data.feature_names and out.shape == (400, 3, 4)
    for t in range(3):  # one (mean, std) per input variable
        v = out.x[:300, t, 0].double()
        assert abs(v.mean().item()) < 1e-5 and abs(v.std(correction=0).item() - 1) < 1e-4
    with pytest.raises(ValueError, match="no row"):
        data.normalized([])
