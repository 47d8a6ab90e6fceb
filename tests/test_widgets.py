"""The clip-value explorer without a kernel: controls, retraining on change, the plot it shows, and the
precomputed grid a static page switches among (the browser's ``jsdlink`` walk is replayed in Python).

Each training is one Ishigami fold of 30 optimizer steps (a few seconds on one CPU thread).
"""
import base64
import io
import math
import subprocess
import sys

import ipywidgets as widgets
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from prot_lib.viz import static_explorer as se
from prot_lib.viz import widgets as pw

STEPS = 30


def _png_in_output(w) -> bytes:
    outs = w.output.outputs
    assert len(outs) == 1 and outs[0]["output_type"] == "display_data", outs
    return base64.b64decode(outs[0]["data"]["image/png"])


@pytest.fixture(scope="module")
def explorer():
    return pw.clip_explorer("ishigami", lr=1e-2, max_steps=STEPS, clip_value=1.0)


def test_importing_viz_needs_no_widgets():
    code = ("import sys, prot_lib.viz; "
            "assert 'ipywidgets' not in sys.modules and 'matplotlib' not in sys.modules, 'eager import'; "
            "from prot_lib.viz import plots, clip_explorer; assert 'ipywidgets' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_controls_are_standard_debounced_widgets(explorer):
    w = explorer
    assert isinstance(w, widgets.Widget)
    # selection widgets only: each has an integer index in the browser, which the static page links
    assert isinstance(w.clip_slider, widgets.SelectionSlider) and isinstance(w.lr_slider, widgets.SelectionSlider)
    assert not w.clip_slider.continuous_update and not w.lr_slider.continuous_update
    assert isinstance(w.off_toggle, widgets.ToggleButtons) and w.off_toggle.value is False
    assert [v for _, v in w.off_toggle.options] == [False, True]
    assert isinstance(w.dataset, widgets.Dropdown) and [v for _, v in w.dataset.options] == ["ishigami", "dyconex"]
    assert isinstance(w.output, widgets.Output)
    # the clip slider spans 1e-2 .. 1e2 at 1-2-5 positions and starts at the asked value
    assert [v for _, v in w.clip_slider.options] == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0,
                                                     50.0, 100.0]
    assert w.clip_slider.value == 1.0 and w.clip_slider.label == "1"
    assert w.lr_slider.value == 1e-2 and [v for _, v in w.lr_slider.options][0] == 1e-4
    # no grid: nothing precomputed, the live plot is what the widget shows
    assert w.grid is None and w.precomputed is None and not w.showing_precomputed


def test_first_draw_shows_clipped_norms(explorer):
    h = explorer.last_result.history
    assert len(h) == STEPS
    assert explorer.last_png.startswith(b"\x89PNG")
    assert _png_in_output(explorer) == explorer.last_png
    finite = np.isfinite(h["grad_norm_before_clip"])
    assert (h.loc[finite, "grad_norm_after_clip"] <= 1.0 + 1e-6).all()
    assert (h["grad_norm_before_clip"] > 1.0).any(), "nothing to clip: the test would prove nothing"


def test_moving_the_slider_retrains_and_redraws(explorer):
    w = explorer
    n, png, hist = w.n_updates, w.last_png, w.last_result.history
    w.clip_slider.value = 0.1  # the observer retrains, as a browser's slider release would
    assert w.n_updates == n + 1
    h = w.last_result.history
    assert w.last_png != png and _png_in_output(w) == w.last_png
    assert not np.allclose(h["grad_norm_after_clip"], hist["grad_norm_after_clip"], equal_nan=True)
    finite = np.isfinite(h["grad_norm_before_clip"])
    assert (h.loc[finite, "grad_norm_after_clip"] <= 0.1 + 1e-6).all()
    assert "clip 0.1" in w.status.value


def test_off_leaves_norms_unclipped(explorer):
    w = explorer
    w.off_toggle.value = True
    assert w.clip_slider.disabled and w.gradient_clip_val is None
    off = w.last_result.history
    assert np.array_equal(off["grad_norm_after_clip"], off["grad_norm_before_clip"], equal_nan=True)
    assert (off["grad_norm_after_clip"] > 0.1 + 1e-6).any()
    w.off_toggle.value = False
    on = w.last_result.history
    assert (on["grad_norm_after_clip"] <= 0.1 + 1e-6).all()
    assert not np.allclose(on["grad_norm_after_clip"], off["grad_norm_after_clip"])


def test_update_is_synchronous_without_observers():
    w = pw.clip_explorer("ishigami", max_steps=STEPS, run=False)
    assert w.last_result is None and w.output.outputs == ()
    w.off_toggle.unobserve_all()  # change a control without retraining, then update() by hand
    w.off_toggle.value = True
    res = w.update()
    assert res is w.last_result and w.n_updates == 1
    assert "clipping off" in w.status.value


def test_dyconex_nan_is_drawn_not_raised():
    w = pw.clip_explorer("dyconex", lr=1e-4, max_steps=5)
    h = w.last_result.history
    assert not h["loss_finite"].iloc[0]  # NaN inputs: the loss is NaN at step 0, clipped or not
    assert w.last_png.startswith(b"\x89PNG") and "non-finite at step 0" in w.status.value


def test_clip_sweep_table_and_figure():
    df = pw.clip_sweep("ishigami", lr=1e-2, clip_values=[None, 0.1], max_steps=STEPS, n_jobs=1, progress=False)
    assert list(df["setting"]) == ["none", "norm 0.1"]
    assert math.isnan(df.loc[0, "gradient_clip_val"]) and df.loc[0, "clipped_fraction"] == 0.0
    assert df.loc[1, "clipped_fraction"] > 0.5  # Ishigami's gradient norms are ~10: 0.1 clips nearly every step
    assert {"nonfinite", "first_nonfinite_step", "fate", "final_loss", "max_loss", "max_grad_norm",
            "n_steps"} <= set(df.columns)
    fig = pw.plot_clip_sweep(df)
    assert fig._suptitle.get_text() == "non-finite runs per gradient_clip_val: norm 0.1: 0/1, none: 0/1"


def test_the_status_line_is_read_from_the_fate(explorer):
    res = explorer.last_result
    s = res.fold_summary(0)
    text = pw.describe_clip_run(res, explorer.gradient_clip_val)
    if s["first_nonfinite_step"] is None:
        assert text.split(": ", 1)[1].startswith(f"finite for {s['n_steps']} steps")
    else:
        assert f"non-finite at step {s['first_nonfinite_step']}" in text


# --- the precomputed grid of the static page ------------------------------------------------------


def test_log_positions_and_nearest():
    assert se.log_positions(1e-4, 1e-1, extra=[3e-3]) == [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2,
                                                         5e-2, 1e-1]
    grid = [0.1, 1.0, 10.0]
    # log10 distance: 0.2 is 0.30 decades from 0.1 and 0.70 from 1; 5 is 0.70 from 1 and 0.30 from 10
    assert [se.nearest_log(v, grid) for v in (0.01, 0.2, 0.5, 2.0, 5.0, 100.0)] == [0.1, 0.1, 1.0, 1.0, 10.0, 10.0]
    assert se.nearest_log(10 ** -0.5, grid) == 0.1  # an exact tie goes to the smaller value
    with pytest.raises(ValueError, match="positive"):
        se.nearest_log(0.0, grid)
    with pytest.raises(ValueError, match="0 < lo < hi"):
        se.log_positions(1.0, 0.1)


def _fake_grid(fold=0, max_steps=STEPS):
    """A grid of distinct fake figures: ishigami at two lrs x {off, 0.1, 10}, dyconex at one lr x {1}."""
    points = {}
    for ds, lrs, clips in (("ishigami", (2e-3, 2e-2), (None, 0.1, 10.0)), ("dyconex", (1e-4,), (1.0,))):
        for lr in lrs:
            for c in clips:
                points[(ds, lr, c)] = se.GridPoint(png=f"png {ds} {lr:g} {c}".encode(), outcome=f"outcome {ds} {lr:g} {c}")
    return se.ExplorerGrid(topology="layers", max_steps=max_steps, seed=0, fold=fold, points=points)


def _shown(w):
    """What the static page shows for the controls' current indices: follow each Stack's jsdlink
    (control.index -> stack.selected_index), as the html-manager does in the browser, down to a leaf."""
    by_target = {id(link.target[0]): link for link in w._links}
    node = w.precomputed.children[1]
    while isinstance(node, widgets.Stack):
        link = by_target[id(node)]
        assert link.source[1] == "index" and link.target[1] == "selected_index"
        assert isinstance(link, widgets.widget_link.DirectionalLink)
        node = node.children[link.source[0].index]
    return node


def test_grid_nearest_mapping():
    g = _fake_grid()
    assert g.datasets == ["ishigami", "dyconex"] and g.lrs("ishigami") == [2e-3, 2e-2]
    assert g.clip_settings("ishigami") == [0.1, 10.0, None]
    assert g.nearest("ishigami", 5e-3, 0.5) == ("ishigami", 2e-3, 0.1)   # 5e-3: 0.40 decades from 2e-3, 0.60 from 2e-2
    assert g.nearest("ishigami", 1e-1, 0.5) == ("ishigami", 2e-2, 0.1)   # 0.5: 0.70 decades from 0.1, 1.30 from 10
    assert g.nearest("ishigami", 1e-1, 2.0) == ("ishigami", 2e-2, 10.0)  # 2: 1.30 decades from 0.1, 0.70 from 10
    assert g.nearest("ishigami", 1e-1, None) == ("ishigami", 2e-2, None)
    assert g.nearest("dyconex", 1e-1, None) is None                      # off was not precomputed for dyconex
    assert g.nearest("dyconex", 1e-1, 0.01) == ("dyconex", 1e-4, 1.0)
    with pytest.raises(ValueError, match="not a full lr x clip product"):
        se.ExplorerGrid("layers", STEPS, 0, 0, {k: v for k, v in list(g.points.items())[1:]})


def test_every_control_position_shows_the_nearest_grid_point():
    g = _fake_grid()
    w = pw.clip_explorer("ishigami", lr=2e-2, max_steps=STEPS, topology="layers", grid=g, run=False)
    for control in (w.clip_slider, w.off_toggle, w.lr_slider, w.dataset, w.model):
        control.unobserve(w._on_change, names="value")  # no kernel: nothing retrains, only the links act
    assert w.showing_precomputed and w.live.layout.display == "none"
    assert se.GRID_NOTE in w.precomputed.children[0].value
    seen = set()
    for ds in ("ishigami", "dyconex"):
        w.dataset.index = [v for _, v in w.dataset.options].index(ds)
        for i_lr, (_, lr) in enumerate(w.lr_slider.options):
            w.lr_slider.index = i_lr
            for off in (False, True):
                w.off_toggle.index = int(off)
                for i_c, (_, c) in enumerate(w.clip_slider.options):
                    w.clip_slider.index = i_c
                    leaf, key = _shown(w), g.nearest(ds, lr, None if off else c)
                    if key is None:
                        assert isinstance(leaf, widgets.HTML) and "not in the precomputed grid" in leaf.value
                        continue
                    text, img = leaf.children
                    assert img.value == g[key].png and g[key].outcome in text.value
                    seen.add(key)
    assert seen == set(g.points), "every grid point's figure is reachable from the controls"
    w.model.index = [v for _, v in w.model.options].index("stacks")  # the other model was not precomputed
    assert "model 'write-up stacks' is not in the precomputed grid" in _shown(w).value
    # each figure is stored once: positions that share a grid point share its Image widget
    assert len({id(img) for img in _images(w.precomputed)}) == len(g)


def _images(node) -> list:
    """Every Image widget below ``node`` (with repeats, as the Stacks reference them)."""
    if isinstance(node, widgets.Image):
        return [node]
    return [img for c in getattr(node, "children", ()) for img in _images(c)]


def test_explorer_grid_trains_the_explorers_runs_and_a_change_goes_live(monkeypatch, tmp_path):
    monkeypatch.setenv("PROT_LIB_CACHE", str(tmp_path))  # the explorer then reads the grid's run back
    g = pw.explorer_grid(["ishigami"], [1e-2], [0.1, 1.0], topology="stacks", max_steps=STEPS)
    assert len(g) == 2 and all(p.png.startswith(b"\x89PNG") for p in g.points.values())
    assert g[("ishigami", 1e-2, 0.1)].png != g[("ishigami", 1e-2, 1.0)].png
    assert g[("ishigami", 1e-2, 0.1)].outcome.startswith("clip 0.1: ")
    w = pw.clip_explorer("ishigami", lr=1e-2, max_steps=STEPS, clip_value=1.0, grid=g)
    # the first draw is the grid point's own figure (same run, same drawing), kept out of the Output
    assert w.last_png == g[("ishigami", 1e-2, 1.0)].png and w.output.outputs == ()
    assert repr(w) == "<clip-value explorer: ishigami, write-up stacks, lr 0.01, clip 1, 2 precomputed runs>"
    w.clip_slider.value = 0.1  # with a kernel: retrain, hide the grid, show the live plot
    assert not w.showing_precomputed and w.live.layout.display is None
    assert _png_in_output(w) == w.last_png == g[("ishigami", 1e-2, 0.1)].png
    with pytest.raises(ValueError, match="not the explorer's"):
        pw.clip_explorer("ishigami", max_steps=STEPS + 1, grid=g, run=False)


def test_compact_png_keeps_the_figure():
    """The explorer's figure with a 64-colour palette: same pixel size, less than half the bytes."""
    rng = np.random.default_rng(0)
    steps = np.arange(120)
    before = np.exp(rng.normal(2.0, 1.0, steps.size))
    h = pd.DataFrame({"step": steps, "fold": 0, "raw_loss": np.exp(rng.normal(2.0, 1.0, steps.size)),
                      "grad_norm_before_clip": before, "grad_norm_after_clip": np.minimum(before, 1.0)})
    fig = Figure(figsize=(12, 4))
    pw.plot_clip_run(h, 1.0, axes=fig.subplots(1, 2))
    full = pw.figure_png(fig)
    small = se.compact_png(full)
    a, b = Image.open(io.BytesIO(full)), Image.open(io.BytesIO(small))
    assert a.size == b.size and b.mode == "P" and len(b.getpalette()) // 3 <= 64
    assert len(small) < 0.5 * len(full), (len(small), len(full))
