"""prot_lib.diagnostics.scan_state: the scan's memory in closed form, and growth with sequence length."""
import math

import pytest
import torch

from prot_lib.diagnostics import (accumulated_terms, effective_memory, fixed_point_by_length, init_step_sizes,
                                  overflow_scale_by_length, scan_memory_table, stack_overflow_by_length,
                                  stack_summary, state_growth_by_length)
from prot_lib.diagnostics.scale import layer_stats
from prot_lib.models import BiMambaStacks, Mamba


def test_effective_memory_closed_form():
    # 1 / (1 - e^{-x}) at x = 0.1, 0.001 and 1: 10.508..., 1000.50..., 1.58197...
    mem = effective_memory(torch.tensor([0.1, 0.001, 1.0], dtype=torch.float64), -1.0)
    assert mem.dtype == torch.float64
    assert torch.allclose(mem, torch.tensor([1 / (1 - math.exp(-0.1)), 1 / (1 - math.exp(-0.001)),
                                             1 / (1 - math.exp(-1.0))], dtype=torch.float64), rtol=1e-12)
    assert abs(float(mem[1]) - 1000.5000833) < 1e-6  # 1/x + 1/2 + x/12 for small x
    # A = -(1..N): memory ~ 1 / (delta * n) for small delta
    n = torch.arange(1, 17, dtype=torch.float64)
    assert torch.allclose(effective_memory(1e-4, -n), 1 / (1e-4 * n) + 0.5, rtol=1e-6)
    assert math.isinf(float(effective_memory(0.0, -1.0)))


def test_effective_memory_rejects_growing_state():
    with pytest.raises(ValueError, match="delta \\* A <= 0"):
        effective_memory(0.1, 1.0)
    with pytest.raises(ValueError, match="L must be >= 1"):
        accumulated_terms(0.1, -1.0, 0)


def test_accumulated_terms_is_the_geometric_sum():
    for delta, L in ((0.1, 3), (0.01, 18), (0.001, 1023), (0.05, 99)):
        a_bar = math.exp(-delta)
        assert float(accumulated_terms(delta, -1.0, L)) == pytest.approx(sum(a_bar ** k for k in range(L)), rel=1e-10)
    # short sequences: ~L; long sequences: the memory
    assert float(accumulated_terms(1e-3, -1.0, 3)) == pytest.approx(2.997, abs=1e-3)
    assert float(accumulated_terms(0.1, -1.0, 10_000)) == pytest.approx(float(effective_memory(0.1, -1.0)), rel=1e-12)
    assert float(accumulated_terms(0.0, -1.0, 7)) == 7.0


def test_fresh_block_dt_in_range_and_A_is_minus_n():
    torch.manual_seed(0)
    block = Mamba(d_model=32, d_state=8, dt_min=0.001, dt_max=0.1)
    dt = init_step_sizes(block)
    assert dt.shape == (64,)
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    table = scan_memory_table(block)
    assert table["A"].tolist() == pytest.approx([-(n + 1.0) for n in range(8)], rel=1e-6)
    slow = table.iloc[0]
    # A = -1: A_bar in [exp(-0.1), exp(-0.001)], memory in [10.5, 1000.5]
    assert math.exp(-0.1) - 1e-6 <= slow["A_bar_min"] <= slow["A_bar_max"] <= math.exp(-0.001) + 1e-6
    assert 10.5 <= slow["memory_min"] < slow["memory_max"] <= 1000.6
    assert (table["memory_max"].diff().dropna() < 0).all()  # faster states (larger |A|) forget sooner


def test_state_grows_with_length_then_saturates():
    torch.manual_seed(0)
    block = Mamba(d_model=16, d_state=4).eval()
    g = state_growth_by_length(block, [3, 30, 300], scale=1.0, batch=2)
    assert g["finite"].all()
    assert (g["terms_median"].diff().dropna() > 0).all()
    assert g.loc[0, "terms_median"] == pytest.approx(3.0, rel=0.05)  # L=3: every token counts fully
    assert g.loc[2, "terms_median"] < 300  # L=300: the leak has set in
    # the slowest state of a small-dt channel grows with L: the largest |h| at L=300 >> at L=3
    assert g.loc[2, "state_max"] > 5 * g.loc[0, "state_max"]
    assert 0.001 < g.loc[0, "delta_median"] < 0.2


def test_fixed_point_moves_down_with_length():
    torch.manual_seed(0)
    block = Mamba(d_model=16, d_state=16).eval()
    fp = fixed_point_by_length(block, [3, 255], [0.5, 1, 2, 4, 8, 16, 32, 64], batch=2)
    assert fp["s_star_rms"].notna().all()
    assert fp.loc[1, "s_star_rms"] < fp.loc[0, "s_star_rms"]
    assert fp.loc[1, "gain_at_1"] > fp.loc[0, "gain_at_1"]


def test_stack_overflow_by_length_and_summary():
    table = stack_overflow_by_length([3, 255], [4, 64], d_model=16, n_layers=4, batch=2)
    assert set(table.columns) >= {"L", "scale", "last_max", "first_nonfinite_layer", "overflow"}
    assert not table.loc[(table["L"] == 3) & (table["scale"] == 4), "overflow"].item()
    first = overflow_scale_by_length(table)
    assert list(first.index) == [3, 255]
    assert first.loc[255] == 64  # the long input overflows at s = 64, not at s = 4
    torch.manual_seed(0)
    model = BiMambaStacks(16, 2, d_state=4, backend="torch").eval()
    calm = stack_summary(layer_stats(model, torch.randn(2, 8, 16)))
    assert calm["finite"] and calm["first_nonfinite_layer"] is None and calm["last_max"] < 10
    assert math.isnan(calm["embedded_max"])
    blown = stack_summary(layer_stats(model, 1e30 * torch.randn(2, 8, 16)))
    assert not blown["finite"] and blown["first_nonfinite_layer"] == 0
