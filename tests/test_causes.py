"""prot_lib.diagnostics.causes: one input trait at a time on the Dyconex stand-in (chapter 2)."""
import math

import pytest
import torch

from prot_lib.data import load_dataset
from prot_lib.diagnostics.causes import DYCONEX_CAUSES, NOTHING, dyconex_variant, masked_mse, trace_causes
from prot_lib.training import NaNStudyModule, fold_indices, reproduction_config


@pytest.fixture(scope="module")
def dy():
    raw = load_dataset("dyconex")
    train_idx, _ = fold_indices(len(raw), 5, 0)[0]
    norm = raw.normalized(train_idx)
    missing_target = [int(i) for i in train_idx if math.isnan(raw.y[i])]
    return raw, norm, list(train_idx[:15]) + [missing_target[0]]


def test_variants_switch_exactly_one_trait(dy):
    raw, norm, rows = dy
    std = dyconex_variant(raw, norm, rows, "std", "std", "zero")
    ts = dyconex_variant(raw, norm, rows, "std", "raw", "zero")
    missing = torch.isnan(raw.x[rows, :, 0])
    assert torch.isfinite(std).all() and float(std.abs().max()) < 100
    assert torch.equal(ts[..., 1], raw.x[rows, :, 1]) and torch.equal(ts[..., 2:], std[..., 2:])
    nan = dyconex_variant(raw, norm, rows, "std", "std", "nan")
    assert torch.equal(torch.isnan(nan[..., 0]), missing) and int(missing.sum()) > 0
    with pytest.raises(ValueError, match="timestamps must be one of"):
        dyconex_variant(raw, norm, rows, "std", "hours", "zero")
    y = torch.tensor([1.0, float("nan"), 3.0])
    assert masked_mse(torch.tensor([2.0, 5.0, 3.0]), y).item() == pytest.approx(0.5)


def test_trace_causes_names_the_loss_for_a_missing_target_and_nothing_when_clean(dy):
    raw, norm, rows = dy
    cfg = reproduction_config("dyconex")
    torch.manual_seed(0)
    model = NaNStudyModule(cfg, n_features=norm.x.shape[-1]).model
    picked = ["missing targets only (NaN)", "none (normalised + masked)", "missing inputs only (NaN)"]
    table = trace_causes(model, {c: dyconex_variant(raw, norm, rows, *DYCONEX_CAUSES[c][:3]) for c in picked},
                         raw.y[rows], {c: DYCONEX_CAUSES[c][3] for c in picked}, "bimamba.forward_layers.0")
    assert table.loc["missing targets only (NaN)", "first non-finite (forward)"] == "loss"
    assert math.isnan(table.loc["missing targets only (NaN)", "loss"])
    assert table.loc["none (normalised + masked)", "first non-finite (forward)"] == NOTHING
    assert math.isfinite(table.loc["none (normalised + masked)", "loss"])
    row = table.loc["missing inputs only (NaN)"]
    assert row["first non-finite (forward)"] == "embedding" and row["born at"] == NOTHING
