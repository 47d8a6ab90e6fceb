"""The clip-value explorer without a kernel: controls, retraining on change, the plot it shows.

Each training is one Ishigami fold of 30 optimizer steps (a few seconds on one CPU thread).
"""
import base64
import math
import subprocess
import sys

import ipywidgets as widgets
import numpy as np
import pytest

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
    assert isinstance(w.clip_slider, widgets.FloatLogSlider) and w.clip_slider.base == 10
    assert isinstance(w.lr_slider, widgets.FloatLogSlider)
    assert not w.clip_slider.continuous_update and not w.lr_slider.continuous_update
    assert isinstance(w.off_toggle, widgets.Checkbox) and not w.off_toggle.value
    assert isinstance(w.dataset, widgets.Dropdown) and set(w.dataset.options) == {"ishigami", "dyconex"}
    assert isinstance(w.output, widgets.Output)
    # the slider spans 1e-2 .. 1e2 on a log scale and starts at the asked value
    assert math.isclose(w.clip_slider.value, 1.0)
    assert (w.clip_slider.min, w.clip_slider.max) == (-2.0, 2.0)


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
