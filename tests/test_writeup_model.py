"""The write-up's own model (issue 8): its topology, its scale map, its reproductions and its final fix.

scipi1/proT's BiMamba (``proT/baseline/s6/s6_wrapper.py``; 2894a5d before its LayerNorm fix, e755f0c^
after) is two independent stacks of plain Mamba blocks, concatenated. These tests pin that structure,
the mechanism that makes it overflow (one block's scale map has an unstable fixed point) and the
reproductions and ``postnorm`` fix built on it. Every test runs in seconds on one CPU thread: small
shapes, few optimizer steps; the numbers at the write-up's scale are in docs/findings.md.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from prot_lib.diagnostics.scale import (block_scale_map, fixed_point, growth_by_input_scale, layer_stats,
                                        overflow_layer, writeup_debug_lines)
from prot_lib.models import BiMamba, BiMambaStacks, Mamba, S6Regressor, build_model
from prot_lib.training import reproduction_config, run_kfold
from prot_lib.training.config import FIXES, reproduction_datasets

MAMBA_NAMES = ["A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
               "dt_proj.weight", "dt_proj.bias", "out_proj.weight"]


def stacks(norm=None, norm_position="post", residual=False, n_layers=3, d_model=8, seed=0):
    torch.manual_seed(seed)
    return BiMambaStacks(d_model, n_layers, d_state=4, norm=norm, norm_position=norm_position,
                         residual=residual, backend="torch").eval()


# --------------------------------------------------------------------------- the topology

def test_default_regressor_is_two_stacks_of_plain_blocks():
    model = build_model({}, n_features=5)  # ModelConfig's defaults: the write-up's model before its fix
    assert model.topology == "stacks" and isinstance(model.bimamba, BiMambaStacks)
    b = model.bimamba
    for blocks in (b.forward_layers, b.backward_layers):
        assert isinstance(blocks, nn.ModuleList) and len(blocks) == 4
        assert all(type(m) is Mamba for m in blocks)
    assert b.forward_layers[0] is not b.backward_layers[0]  # independent weights
    # nothing between the blocks: no norm, no final norm, no dropout, no residual
    assert all(isinstance(n, nn.Identity) for n in [*b.forward_norms, *b.backward_norms, b.forward_norm_f,
                                                     b.backward_norm_f, b.dropout])
    assert b.residual is False
    assert model.head.in_features == 2 * 16  # the concatenated context
    assert model(torch.randn(3, 7, 5)).shape == (3,)


def test_parameter_names_are_the_writeups():
    # The write-up's BiMamba (mamba-ssm path): forward_layers.i / backward_layers.i holding mamba-ssm's
    # parameter names; after its fix also forward_norms.i / backward_norms.i (LayerNorm weight, bias).
    expected = {f"{side}_layers.{i}.{p}" for side in ("forward", "backward") for i in range(3) for p in MAMBA_NAMES}
    assert set(stacks().state_dict()) == expected
    norms = {f"{side}_norms.{i}.{p}" for side in ("forward", "backward") for i in range(3) for p in ("weight", "bias")}
    assert set(stacks(norm="layernorm").state_dict()) == expected | norms


def test_output_is_the_two_stacks_concatenated_without_residual():
    model = stacks()
    x = torch.randn(2, 9, 8)
    with torch.no_grad():
        out = model(x)
        f, b = x, x.flip(1)
        for blk in model.forward_layers:  # a plain chain: block after block, nothing added back
            f = blk(f)
        for blk in model.backward_layers:
            b = blk(b)
    assert out.shape == (2, 9, 16)
    torch.testing.assert_close(out[..., :8], f, rtol=0, atol=0)
    torch.testing.assert_close(out[..., 8:], b.flip(1), rtol=0, atol=0)
    # no residual: silencing every block of the forward stack silences its half of the output
    with torch.no_grad():
        for blk in model.forward_layers:
            blk.out_proj.weight.zero_()
        assert model(x)[..., :8].abs().max() == 0.0
        assert model(x)[..., 8:].abs().max() > 0.0


def test_each_half_sees_one_direction_only():
    model = stacks()
    x = torch.randn(1, 12, 8)
    changed = x.clone()
    changed[:, 7:] += 5.0  # tokens 7.. change
    with torch.no_grad():
        a, b = model(x), model(changed)
    # the forward half of tokens 0-6 only reads tokens 0-6; the backward half of every token reads later ones
    torch.testing.assert_close(a[:, :7, :8], b[:, :7, :8], rtol=0, atol=0)
    assert (a[:, :7, 8:] - b[:, :7, 8:]).abs().max() > 1e-6
    changed = x.clone()
    changed[:, :3] += 5.0  # tokens 0-2 change: the backward half of tokens 3.. must not move
    with torch.no_grad():
        c = model(changed)
    torch.testing.assert_close(a[:, 3:, 8:], c[:, 3:, 8:], rtol=0, atol=0)


def test_topology_options_and_errors():
    layers = build_model({"topology": "layers"}, n_features=4)
    assert isinstance(layers.bimamba, BiMamba) and layers.head.in_features == 16
    assert layers.bimamba.layers[0].residual is True  # residual: null -> the topology's default
    with pytest.raises(ValueError, match="norm_position"):
        build_model({"topology": "layers", "norm": "layernorm", "norm_position": "post"}, 4)
    with pytest.raises(ValueError, match="combine"):
        build_model({"combine": "mean"}, 4)
    with pytest.raises(ValueError, match="topology"):
        build_model({"topology": "tree"}, 4)
    with pytest.raises(KeyError, match="n_layer"):
        build_model({"n_layer": 2}, 4)
    with pytest.raises(ValueError, match="dropout"):
        BiMambaStacks(8, 2, dropout=1.5, backend="torch")


@pytest.mark.parametrize("norm_position, residual", [("post", False), ("post", True), ("pre", False), ("pre", True)])
def test_block_step_follows_the_documented_table(norm_position, residual):
    model = stacks(norm="layernorm", norm_position=norm_position, residual=residual)
    B, N = model.forward_layers[0], model.forward_norms[0]
    h = 3.0 * torch.randn(2, 6, 8)
    with torch.no_grad():
        expected = {("post", False): N(B(h)), ("post", True): N(h + B(h)),
                    ("pre", False): B(N(h)), ("pre", True): h + B(N(h))}[(norm_position, residual)]
        torch.testing.assert_close(model.block_step("forward", 0, h), expected, rtol=0, atol=0)
    assert isinstance(model.forward_norm_f, nn.LayerNorm) == (norm_position == "pre")


# --------------------------------------------------------------------------- the scale map

@pytest.fixture(scope="module")
def block_map():
    torch.manual_seed(0)
    block = Mamba(16, backend="torch")
    return block_scale_map(block, [0.25, 0.5, 1, 2, 4, 8, 12, 16, 24, 32, 48], shape=(4, 64, 16), seed=0)


def test_one_block_is_superlinear_at_large_scale(block_map):
    m = block_map.set_index("scale")
    # near-linear at small s, a power law with exponent well above 1 at large s
    assert m.loc[0.25, "k_rms"] < 1.5
    assert m.loc[[24, 32], "k_rms"].min() > 4.0, m["k_rms"].tolist()
    assert (m["k_rms"].diff().dropna() > -0.5).all()  # the exponent rises with s (up to noise)


def test_unstable_fixed_point(block_map):
    s_star = fixed_point(block_map)
    assert 4.0 < s_star < 32.0, s_star
    m = block_map.set_index("scale")
    below, above = m[m.index < s_star], m[m.index > s_star]
    assert (below["out_rms"] < below["in_rms"]).all()  # below s*: the block shrinks its input
    assert (above["out_rms"] > above["in_rms"]).all()  # above s*: it amplifies it
    assert m.loc[s_star:, "k_rms"].iloc[0] > 1.0  # slope > 1 where it crosses: unstable


def test_growth_by_depth_shrinks_below_and_overflows_above():
    g = growth_by_input_scale([1.0, 40.0], shape=(2, 32, 16), n_layers=4, variants={
        "stacks": dict(topology="stacks"),
        "postnorm": dict(topology="stacks", norm="layernorm", norm_position="post"),
        "residual": dict(topology="stacks", residual=True)})
    fwd = g[g["stack"] == "forward"].set_index(["variant", "scale", "layer"])["max_abs"]
    small = [fwd["stacks", 1.0, i] for i in range(4)]
    assert all(b < a / 5 for a, b in zip(small, small[1:])), small  # each layer shrinks it
    big = [fwd["stacks", 40.0, i] for i in range(4)]
    assert big[0] > 40.0 and (math.isnan(big[-1]) or big[-1] > 1e20), big  # grows until it overflows
    for s in (1.0, 40.0):  # LayerNorm after every block: the same scale at every depth
        assert all(1.0 < fwd["postnorm", s, i] < 4.0 for i in range(4))
    x_max = g[(g["stack"] == "input") & (g["scale"] == 1.0)]["max_abs"].iloc[0]
    res = [fwd["residual", 1.0, i] for i in range(4)]
    assert all(0.5 * x_max < r < 2 * x_max for r in res), (x_max, res)  # a residual stream keeps its scale
    stats = g[(g["variant"] == "stacks") & (g["scale"] == 40.0)]
    lines = writeup_debug_lines(stats.drop(columns=["variant", "scale"]).reset_index(drop=True))
    assert lines[0].startswith("[BiMamba DEBUG] Forward layer 0 OK - min=")


# --------------------------------------------------------------------------- reproductions and postnorm

def test_postnorm_is_one_overlay_on_every_reproduction():
    assert "postnorm" in FIXES
    assert set(reproduction_datasets()) >= {"ishigami", "dyconex", "dyconex_long", "dyconex_long_ci"}
    for ds in reproduction_datasets():
        base, fixed = reproduction_config(ds), reproduction_config(ds, "postnorm")
        assert base.model.topology == "stacks" and base.model.norm is None and not base.model.residual
        assert (fixed.model.norm, fixed.model.norm_position, fixed.model.residual) == ("layernorm", "post", False)
        b = base.to_dict()
        f = fixed.to_dict()
        for d in (b, f):
            d.pop("name")
        b["model"].update(norm="layernorm", norm_position="post", residual=False)
        assert b == f  # nothing else changes
        model = build_model(fixed.model, 4).bimamba
        assert all(isinstance(n, nn.LayerNorm) for n in [*model.forward_norms, *model.backward_norms])
        assert len(model.forward_norms) == len(model.backward_norms) == fixed.model.n_layers


def test_writeup_scale_config_is_the_writeups_shape():
    cfg = reproduction_config("dyconex_long")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.training.batch_size, cfg.training.lr) == (100, 4, 50, 1e-4)
    from prot_lib.data import load_dataset
    assert load_dataset("dyconex_long_ci").x.shape == (100, 99, 15)


def test_ci_scale_reproduction_overflows_layer_by_layer_and_postnorm_holds():
    cfg = reproduction_config("dyconex_long_ci")
    res = run_kfold(cfg, folds=[1], max_steps=1, keep_models=False, progress=False)
    assert res.fold_summary(1)["first_nonfinite_loss_step"] == 0  # NaN at once, as at the write-up's scale
    # why: at initialisation, the forward stack of fold 1 grows by orders of magnitude per layer
    from prot_lib.data import load_dataset
    from prot_lib.training.kfold import fold_indices, make_loaders
    import lightning.pytorch as pl
    data = load_dataset(cfg.data.name)
    tr, va = fold_indices(len(data), 5, cfg.training.seed)[1]
    pl.seed_everything(cfg.training.seed + 1, verbose=False)
    x, _ = next(iter(make_loaders(data, tr, va, cfg.training.batch_size, cfg.training.seed + 1)[0]))
    st = layer_stats(build_model(cfg.model, data.x.shape[-1]).eval(), x)
    fwd = st[st["stack"] == "forward"]["max_abs"].tolist()
    assert overflow_layer(st, "forward") == 3, fwd  # measured: 3.4e2, 4.2e6, 6.4e26, NaN
    assert fwd[1] > 100 * fwd[0] and fwd[2] > 1e6 * fwd[1]
    fixed = run_kfold(reproduction_config("dyconex_long_ci", "postnorm"), folds=[1], max_steps=2,
                      keep_models=False, progress=False)
    s = fixed.fold_summary(1)
    assert s["first_nonfinite_loss_step"] is None and s["params_finite_end"]


def test_postnorm_does_not_rescue_the_short_dyconex():
    # LayerNorm of a NaN token is NaN, and raw Unix timestamps overflow the first block before any norm.
    res = run_kfold(reproduction_config("dyconex", "postnorm"), folds=[0], max_steps=1, keep_models=False,
                    progress=False)
    assert res.fold_summary(0)["first_nonfinite_loss_step"] == 0


def test_ishigami_overflows_at_a_large_lr_and_postnorm_holds():
    # The shipped Ishigami reproduction diverges in some folds after ~50-200 steps at lr 2e-2 (too slow
    # for a unit test; its rates are in docs/findings.md). At lr 0.1 every fold of seeds 0-4 went NaN
    # by step 12 (25/25; docs/findings/stacks_ishigami_none_lr1e-1_e3_seeds0-4.json) and every
    # postnorm fold stayed finite for 75 steps (0/25): the pattern, not a step, is asserted here.
    cfg = reproduction_config("ishigami").updated({"training.lr": 0.1})
    dead = run_kfold(cfg, folds=[0], max_steps=20, keep_models=False, progress=False).fold_summary(0)
    assert dead["first_nonfinite_loss_step"] is not None and dead["params_finite_end"] is False
    fixed = run_kfold(reproduction_config("ishigami", "postnorm").updated({"training.lr": 0.1}), folds=[0],
                      max_steps=20, keep_models=False, progress=False).fold_summary(0)
    assert fixed["first_nonfinite_loss_step"] is None and fixed["params_finite_end"] is True


def test_what_a_norm_after_the_block_cannot_undo():
    # postnorm normalises a block's *output*: once the first block has overflowed, LayerNorm turns an inf
    # into NaN for the whole token, and values whose square overflows float32 (|x| > 1.8e19) into a
    # silent 0 (its variance is inf). The short Dyconex stand-in's raw timestamps do the first.
    ln = nn.LayerNorm(3, elementwise_affine=False)
    with torch.no_grad():
        assert torch.isnan(ln(torch.tensor([[math.inf, 1.0, 5.0]]))).all()
        assert ln(torch.tensor([[1e23, -1e23, 5.0]])).abs().max() == 0.0
        torch.testing.assert_close(ln(torch.tensor([[1e19, -1e19, 0.0]])), torch.tensor([[1.2247, -1.2247, 0.0]]),
                                   rtol=1e-4, atol=1e-4)


def test_fold_start_is_the_model_and_batch_train_fold_starts_with():
    # what run_kfold's first optimizer step sees: the initial weights and the first training batch
    import lightning.pytorch as pl

    from prot_lib.training import fold_start

    class FirstStep(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 0:
                self.state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
                self.x = batch[0].clone()

    cfg = reproduction_config("ishigami")
    seen = FirstStep()
    run_kfold(cfg, folds=[2], max_steps=1, callbacks=[seen], progress=False)
    model, x, y = fold_start(cfg, 2)
    assert not model.training and x.shape == (cfg.training.batch_size, 3, 4) and y.shape == (x.shape[0],)
    assert torch.equal(x, seen.x)
    state = model.state_dict()
    assert state.keys() == seen.state.keys() and all(torch.equal(state[k], seen.state[k]) for k in state)
    with pytest.raises(ValueError, match="fold must be in 0..4"):
        fold_start(cfg, 5)


def test_reproduction_config_swaps_the_topology_before_the_fix():
    from prot_lib.training import topology_overrides
    from prot_lib.training.config import ConfigError

    plain = reproduction_config("ishigami")
    layers = reproduction_config("ishigami", topology="layers")
    assert (plain.model.topology, plain.model.residual) == ("stacks", False)
    assert (layers.model.topology, layers.model.residual) == ("layers", None)  # None: the topology's own (residual)
    assert build_model(layers.model, 4).bimamba.__class__ is BiMamba
    # everything but the model is the shipped file's; the fix goes on top of the swapped model
    assert layers.training == plain.training and layers.data == plain.data
    ln = reproduction_config("ishigami", "layernorm", topology="layers")
    assert (ln.model.topology, ln.model.norm, ln.model.norm_position, ln.model.residual) == ("layers", "layernorm", "pre", True)
    assert reproduction_config("ishigami", topology="stacks") == plain
    assert topology_overrides("layers") == {"model.topology": "layers", "model.residual": None}
    assert plain.updated(topology_overrides("layers")).model == layers.model
    with pytest.raises(ConfigError, match="unknown topology 'vim'; valid: stacks, layers"):
        reproduction_config("ishigami", topology="vim")


def test_scale_plots_draw_the_tables_they_are_given():
    import matplotlib

    matplotlib.use("Agg")
    from prot_lib.viz.scale_plots import FLOAT32_MAX, plot_layer_growth, plot_scale_map

    torch.manual_seed(0)
    smap = block_scale_map(Mamba(d_model=8, d_state=4).eval(), [0.5, 4, 64], shape=(2, 16, 8))
    ax = plot_scale_map(smap, fixed_point(smap), title="t")
    xs, ys = ax.lines[0].get_data()
    assert list(xs) == list(smap["in_rms"]) and list(ys) == list(smap["out_rms"])
    growth = growth_by_input_scale([1, 100], shape=(2, 16, 8), n_layers=3)
    fig = plot_layer_growth(growth, ["stacks (write-up)", "stacks + postnorm (their fix)"], title="g")
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "stacks (write-up)"
    overflowed = [ln for ln in fig.axes[0].lines if list(ln.get_ydata()) and ln.get_ydata()[-1] == FLOAT32_MAX]
    plain100 = growth[(growth["variant"] == "stacks (write-up)") & (growth["scale"] == 100) & (growth["stack"] == "forward")]
    assert bool(plain100["max_abs"].isna().any()) == (len(overflowed) > 0)
    with pytest.raises(ValueError, match="measure must be"):
        plot_scale_map(smap, measure="mean")
