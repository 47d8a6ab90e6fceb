"""Data guards and missing values: errors that name the sample and the feature, batches unchanged
when the data is clean, and the bias nan_to_num puts into the targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from prot_lib.data import DataError, GuardedDataset, check_finite_batch, load_dataset
from prot_lib.diagnostics.missing import compare_target_handling, prediction_bias, with_targets_nan_to_num
from prot_lib.training import fold_indices, reproduction_config, run_kfold
from prot_lib.training.kfold import make_loaders

NAMES = ["a", "b", "c"]


def _batch(n=4, L=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, L, len(NAMES), generator=g), torch.randn(n, generator=g)


def test_clean_batch_passes():
    x, y = _batch()
    check_finite_batch(x, y, NAMES)


def test_nan_input_names_sample_row_id_feature_and_token():
    x, y = _batch()
    x[2, 3, 1] = float("nan")
    with pytest.raises(DataError) as err:
        check_finite_batch(x, y, NAMES, sample_index=[10, 11, 12, 13], row_ids=[f"C{i:03d}" for i in range(20)])
    assert str(err.value) == "non-finite input in sample 12 (row id 'C012'), feature 'b' (index 1), token 3: nan"


def test_inf_is_never_exempt_and_nan_is_exempt_only_in_nullable_features():
    x, y = _batch()
    x[1, 0, 2] = float("nan")
    check_finite_batch(x, y, NAMES, nullable_features=["c"])
    x[0, 4, 2] = float("inf")
    with pytest.raises(DataError, match=r"sample 0, feature 'c' \(index 2\), token 4: inf"):
        check_finite_batch(x, y, NAMES, nullable_features=["c"])


def test_declared_nullable_feature_gets_a_hint_but_no_exemption():
    x, y = _batch()
    x[0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="declared nullable.*data.normalize: true"):
        check_finite_batch(x, y, NAMES, declared_nullable=["a"])


def test_targets_nan_allowed_only_when_masked_inf_never():
    x, y = _batch()
    y[3] = float("nan")
    with pytest.raises(DataError, match=r"non-finite target in sample 3: nan \(a missing label: mask it"):
        check_finite_batch(x, y, NAMES)
    check_finite_batch(x, y, NAMES, allow_missing_targets=True)
    y[1] = float("-inf")
    with pytest.raises(DataError, match="non-finite target in sample 1: -inf"):
        check_finite_batch(x, y, NAMES, allow_missing_targets=True)


def test_loaders_with_rows_yield_the_same_batches_plus_each_samples_row():
    data = load_dataset("ishigami")
    train_idx, val_idx = fold_indices(len(data), 5, 0)[0]
    plain = make_loaders(data, train_idx, val_idx, 32, seed=3)
    with_rows = make_loaders(data, train_idx, val_idx, 32, seed=3, with_rows=True)
    for a, b in zip(plain, with_rows):
        batches_a, batches_b = list(a), list(b)
        assert len(batches_a) == len(batches_b)
        for (xa, ya), (xb, yb, rows) in zip(batches_a, batches_b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert torch.equal(data.x[rows], xb) and torch.equal(data.y[rows], yb)


def test_guarded_dataset_yields_the_same_items_as_tensor_dataset():
    data = load_dataset("ishigami")
    rows = fold_indices(len(data), 5, 0)[0][0]
    guarded = list(DataLoader(GuardedDataset(data, rows), batch_size=64))
    plain = list(DataLoader(TensorDataset(data.x[rows], data.y[rows]), batch_size=64))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(plain, guarded))


def test_guarded_dataset_names_the_row_of_the_full_dataset():
    data = load_dataset("dyconex")  # raw: NaN in the nullable "value" feature, NaN labels
    rows = np.arange(len(data))
    bad_x = torch.isnan(data.x).any(dim=(1, 2)).nonzero()[0, 0].item()
    ds = GuardedDataset(data, rows, allow_missing_targets=True)
    loader = DataLoader(ds, batch_size=len(data))
    with pytest.raises(DataError) as err:
        next(iter(loader))
    msg = str(err.value)
    row_id = data.meta["row_ids"][bad_x]
    assert msg.startswith(f"non-finite input in sample {bad_x} (row id {row_id!r}), feature 'value'")
    assert "declared nullable" in msg


def test_normalized_dyconex_passes_the_guard():
    data = load_dataset("dyconex")
    train_idx, _ = fold_indices(len(data), 5, 0)[0]
    norm = data.normalized(train_idx)
    check_finite_batch(norm.x, norm.y, norm.feature_names, allow_missing_targets=True)


def test_data_guard_switch_in_a_run(tmp_path, monkeypatch):
    monkeypatch.delenv("PROT_LIB_CACHE", raising=False)
    cfg = reproduction_config("dyconex").updated({"training.data_guard": True})
    with pytest.raises(DataError, match=r"non-finite input in batch 0 \(epoch 0\), sample \d+ \(row id .*\), "
                                        r"feature 'value' \(index \d+\), token \d+: nan \(the feature is declared"):
        run_kfold(cfg, folds=[0], max_steps=2, run_dir=tmp_path / "r", progress=False)
    # normalised inputs and masked labels: nothing non-finite reaches the model, the guard is silent
    cfg = reproduction_config("dyconex", "normalize").updated({"training.data_guard": True})
    res = run_kfold(cfg, folds=[0], max_steps=2, run_dir=tmp_path / "r2", progress=False)
    assert res.nan_folds == []


# --- nan_to_num on targets vs masking --------------------------------------------------------------


def test_nan_to_num_targets_bias_the_fit_toward_zero_by_about_q_times_the_mean():
    data = load_dataset("dyconex")
    train_idx, val_idx = fold_indices(len(data), 5, 0)[0]
    t = compare_target_handling(data, train_idx, val_idx, missing_fractions=(0.2, 0.5))
    n2n = t[t["handling"] == "nan_to_num"].reset_index(drop=True)
    mask = t[t["handling"] == "mask"].reset_index(drop=True)
    assert (mask["invented_labels"] == 0).all() and (n2n["invented_labels"] > 0).all()
    assert (n2n["labels_in_loss"] > mask["labels_in_loss"]).all()
    # measured on this probe: bias_vs_mask -0.34 (q=0.2) and -0.98 (q=0.5), against -q*mu = -0.36, -0.99
    np.testing.assert_allclose(n2n["bias_vs_mask"], n2n["expected_bias_constant"], atol=0.1)
    assert n2n["bias_vs_mask"].iloc[1] < n2n["bias_vs_mask"].iloc[0] < -0.2
    assert (n2n["val_rmse"] > mask["val_rmse"]).all()


def test_with_targets_nan_to_num_and_prediction_bias():
    data = load_dataset("dyconex")
    filled = with_targets_nan_to_num(data)
    assert torch.isfinite(filled.y).all() and torch.isnan(data.y).any()
    assert (filled.y[torch.isnan(data.y)] == 0).all()

    class Const(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0],), 2.0)

    rows = np.arange(50)
    got = prediction_bias(Const(), filled, rows, truth=data.y)
    y = data.y[:50]
    y = y[torch.isfinite(y)].double()
    assert got["n"] == len(y)
    assert got["bias"] == pytest.approx(float((2.0 - y).mean()))
