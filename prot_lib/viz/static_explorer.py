"""The clip-value explorer without a kernel: a precomputed grid, switched in the browser by linked widgets.

A static page (the built book) has the explorer's widget state but no kernel, so moving a control
cannot retrain. Instead the chapter trains a small grid at build time (:func:`prot_lib.viz.widgets.explorer_grid`:
clipping off and a few clip values, times a few learning rates, per dataset) and the explorer carries
one figure per grid point. Moving a control in the page shows the figure of the nearest grid point.

Mechanism, and why this one. Every control the explorer has is a *selection* widget with an integer
``index`` synced to the browser: the clip and learning-rate sliders are ``SelectionSlider`` over fixed
log-spaced positions (1-2-5 per decade, :func:`log_positions`), "clipping" is ``ToggleButtons``
(clip | off), dataset and model are ``Dropdown``. Each control's ``index`` is ``jsdlink``-ed to the
``selected_index`` of ``ipywidgets.Stack`` containers nested in control order (model -> dataset ->
learning rate -> clipping -> clip value); a Stack shows only its selected child, and child ``i`` of a
level is the subtree of the grid point nearest to position ``i`` of that control (:func:`nearest_log`,
in log10 distance). Children are *references*: positions that share a grid point share one widget, so
each figure (a ``widgets.Image`` holding PNG bytes) is stored once in the page.

- Why selection widgets: a link copies a value as it is, and a Stack's ``selected_index`` must be an
  integer. The former ``FloatLogSlider`` (a float) and "off" ``Checkbox`` (a bool) cannot select a
  child without code in between; a ``SelectionSlider`` at the same kind of log positions looks and
  behaves the same, and its ``index`` can.
- It needs no JavaScript of ours: ``DirectionalLinkModel`` and ``StackModel`` are part of
  ``@jupyter-widgets/controls`` 5, which the vendored ``@jupyter-widgets/html-manager`` (``embed-amd.js``)
  bundles; the links run in the browser from the embedded widget state, and a page without a kernel
  needs nothing else (``tests/test_browser.py::test_static_explorer_switches_precomputed_figures``
  moves the slider in Chromium, offline, on the built chapter). An anywidget would need its ES module and the anywidget runtime shipped with the
  book and loaded by the html-manager (a third-party module: another vendored file per release).
- The figures are the same matplotlib/seaborn PNGs the live explorer draws
  (:func:`prot_lib.viz.widgets.render_clip_run`), so the static page keeps the book's look.
- With a kernel the same links run too (they only switch the Stacks), and the explorer's Python
  observers retrain as before; on the first change the explorer hides the precomputed view and shows
  its live plot (:class:`prot_lib.viz.widgets.ClipExplorer`).

Only a ``text/plain`` repr would leak into a static page when the widget view cannot be rendered; the
explorer's repr is therefore one short line (``ClipExplorer.__repr__``), never the children tree.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import ipywidgets as widgets
from PIL import Image  # Pillow: matplotlib's own dependency, used here to shrink the PNGs

__all__ = ["GRID_NOTE", "GridPoint", "ExplorerGrid", "log_positions", "nearest_log", "grid_key",
           "compact_png", "precomputed_view"]

#: the visible note above the precomputed figures
GRID_NOTE = "precomputed grid; run the notebook for any value"

#: (dataset, lr, gradient_clip_val or None for off)
GridKey = Tuple[str, float, Optional[float]]


def log_positions(lo: float, hi: float, extra: Sequence[float] = ()) -> List[float]:
    """The values 1, 2, 5 x 10^k inside ``[lo, hi]`` (bounds included when they are of that form),
    plus ``extra`` values, sorted and de-duplicated (to 12 significant digits).

    Raises:
        ValueError: unless ``0 < lo < hi``.
    """
    if not 0 < lo < hi:
        raise ValueError(f"log_positions needs 0 < lo < hi, got {lo!r}, {hi!r}")
    values = set()
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1.0, 2.0, 5.0):
            v = float(f"{m * 10.0 ** k:.12g}")
            if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
                values.add(v)
    values |= {float(f"{float(v):.12g}") for v in extra}
    return sorted(values)


def nearest_log(value: float, candidates: Sequence[float]) -> float:
    """The candidate nearest to ``value`` in log10 distance; on a tie the smaller one.

    Raises:
        ValueError: no candidates, or a value or candidate that is not positive.
    """
    cands = sorted(float(c) for c in candidates)
    if not cands or value <= 0 or cands[0] <= 0:
        raise ValueError(f"nearest_log needs a positive value and positive candidates, got {value!r}, {candidates!r}")
    lv = math.log10(value)
    return min(cands, key=lambda c: (round(abs(math.log10(c) - lv), 9), c))


def compact_png(png: bytes, colors: int = 64) -> bytes:
    """``png`` re-encoded with a palette of at most ``colors`` colours (Pillow median cut, no dithering).

    A line plot has few colours: on the explorer's figure (about 1180 x 400 px) this keeps the look
    and makes the file less than half as large (``tests/test_widgets.py::test_compact_png_keeps_the_figure``),
    and the static page stores one such file per grid point. Same pixel size; mode "P" (palette).
    """
    im = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, format="PNG", optimize=True)
    return out.getvalue()


def grid_key(dataset: str, lr: float, gradient_clip_val: Optional[float]) -> GridKey:
    """A grid point's key, floats rounded to 12 significant digits (so 0.1 from a slider and from a
    parameter cell are the same key); 0 or None clip means off (None)."""
    clip = float(f"{float(gradient_clip_val):.12g}") if gradient_clip_val else None
    return dataset, float(f"{float(lr):.12g}"), clip


@dataclass
class GridPoint:
    """One precomputed run: the figure (PNG bytes) and its one-line outcome (plain text)."""

    png: bytes
    outcome: str


@dataclass
class ExplorerGrid:
    """The explorer's precomputed runs: one :class:`GridPoint` per (dataset, lr, clip value or off) of
    one model (``topology``), each the same short run the live explorer trains (``max_steps``
    optimizer steps of fold ``fold`` of seed ``seed``).

    ``points`` must hold, per dataset, every (lr, clip) pair of that dataset's lrs x clip settings.

    Raises:
        ValueError: at construction, if a dataset's points are not a full lr x clip product.
    """

    topology: str
    max_steps: int
    seed: int
    fold: int
    points: Dict[GridKey, GridPoint] = field(default_factory=dict)

    def __post_init__(self):
        self.points = {grid_key(*k): v for k, v in self.points.items()}
        for ds in self.datasets:
            have = {(lr, c) for d, lr, c in self.points if d == ds}
            want = {(lr, c) for lr in self.lrs(ds) for c in self.clip_settings(ds)}
            if have != want:
                raise ValueError(f"grid for {ds!r} is not a full lr x clip product: missing "
                                 f"{sorted(want - have, key=str)}")

    @property
    def datasets(self) -> List[str]:
        return list(dict.fromkeys(d for d, _, _ in self.points))

    def lrs(self, dataset: str) -> List[float]:
        """The learning rates of ``dataset``'s points, ascending."""
        return sorted({lr for d, lr, _ in self.points if d == dataset})

    def clip_settings(self, dataset: str) -> List[Optional[float]]:
        """``dataset``'s clip values ascending, None (off) last when present."""
        vals = {c for d, _, c in self.points if d == dataset}
        return sorted(v for v in vals if v is not None) + ([None] if None in vals else [])

    def nearest(self, dataset: str, lr: float, gradient_clip_val: Optional[float]) -> Optional[GridKey]:
        """The key of the grid point the static page shows for these control values: same dataset,
        nearest lr and nearest clip value in log10 (:func:`nearest_log`); off maps to off. None when
        the dataset, or the asked off/on, is not in the grid."""
        if dataset not in self.datasets:
            return None
        clips = self.clip_settings(dataset)
        if not gradient_clip_val:
            clip = None if None in clips else False
        else:
            on = [c for c in clips if c is not None]
            clip = nearest_log(gradient_clip_val, on) if on else False
        if clip is False:
            return None
        return grid_key(dataset, nearest_log(lr, self.lrs(dataset)), clip)

    def __getitem__(self, key: GridKey) -> GridPoint:
        return self.points[grid_key(*key)]

    def __len__(self) -> int:
        return len(self.points)

    def __repr__(self) -> str:
        return (f"ExplorerGrid(topology={self.topology!r}, {len(self)} points, datasets={self.datasets}, "
                f"max_steps={self.max_steps}, seed={self.seed}, fold={self.fold})")


def _leaf(point: GridPoint, key: GridKey) -> widgets.VBox:
    ds, lr, clip = key
    where = f"grid point: {ds}, lr {lr:g}, " + (f"clip {clip:g}" if clip else "clipping off")
    text = widgets.HTML(value=f"<b>{point.outcome}</b> &nbsp;·&nbsp; <span class='grid-point'>{where}</span>")
    text.add_class("explorer-outcome")
    img = widgets.Image(value=point.png, format="png", layout=widgets.Layout(max_width="100%", height="auto"))
    return widgets.VBox([text, img])


def _pairs(control: widgets.Widget) -> list:
    """(label, value) of each option of a selection widget (options given as values or as pairs)."""
    return [tuple(o) if isinstance(o, (tuple, list)) else (str(o), o) for o in control.options]


def _options(control: widgets.Widget) -> list:
    """The option values of a selection widget, in order (position i is ``index == i``)."""
    return [v for _, v in _pairs(control)]


def _stack(children: Sequence[widgets.Widget], control: widgets.Widget, links: list) -> widgets.Stack:
    """A Stack whose selected child follows ``control.index`` in the browser (jsdlink)."""
    stack = widgets.Stack(children=list(children), selected_index=control.index)
    links.append(widgets.jsdlink((control, "index"), (stack, "selected_index")))
    return stack


def precomputed_view(grid: ExplorerGrid, *, model: widgets.Dropdown, dataset: widgets.Dropdown,
                     lr_slider: widgets.SelectionSlider, off_toggle: widgets.ToggleButtons,
                     clip_slider: widgets.SelectionSlider) -> Tuple[widgets.VBox, list]:
    """The nested Stacks that show, for any position of the five controls, the figure of the nearest
    grid point (see the module docstring), under the note :data:`GRID_NOTE`.

    Args:
        grid: the precomputed runs.
        model, dataset: ``Dropdown`` whose option values are a topology and a dataset name.
        lr_slider, clip_slider: ``SelectionSlider`` whose option values are floats (lr, clip value).
        off_toggle: ``ToggleButtons`` with option values False (clip) and True (off).

    Returns:
        (the view, the ``jsdlink`` objects that drive it).
    """
    links: list = []
    placeholders: Dict[str, widgets.HTML] = {}

    def placeholder(what: str) -> widgets.HTML:  # one widget per message, shared by every position
        if what not in placeholders:
            placeholders[what] = widgets.HTML(value=f"<i>{what} is not in the precomputed grid of this page; "
                                                    f"run the notebook to train it.</i>")
        return placeholders[what]

    leaves: Dict[GridKey, widgets.VBox] = {k: _leaf(p, k) for k, p in grid.points.items()}
    lr_values = [float(v) for v in _options(lr_slider)]
    clip_values = [float(v) for v in _options(clip_slider)]
    offs = [bool(v) for v in _options(off_toggle)]
    dataset_children = []
    for ds in _options(dataset):
        if ds not in grid.datasets:
            dataset_children.append(placeholder(f"dataset {ds!r}"))
            continue
        by_lr: Dict[float, widgets.Widget] = {}  # one clipping subtree per grid lr, shared by positions
        lr_children = []
        for lr in lr_values:
            glr = nearest_log(lr, grid.lrs(ds))
            if glr not in by_lr:
                clip_children = []
                for c in clip_values:
                    key = grid.nearest(ds, glr, c)
                    clip_children.append(leaves[key] if key else placeholder("clipping on"))
                off_children = []
                for off in offs:
                    if off:
                        key = grid.nearest(ds, glr, None)
                        off_children.append(leaves[key] if key else placeholder("clipping off"))
                    else:
                        off_children.append(_stack(clip_children, clip_slider, links))
                by_lr[glr] = _stack(off_children, off_toggle, links)
            lr_children.append(by_lr[glr])
        dataset_children.append(_stack(lr_children, lr_slider, links))
    model_children = [_stack(dataset_children, dataset, links) if topo == grid.topology
                      else placeholder(f"model {label!r}") for label, topo in _pairs(model)]
    note = widgets.HTML(value=f"<span class='explorer-grid-note'><b>{GRID_NOTE}</b> "
                              f"({len(grid)} runs of {grid.max_steps} optimizer steps, fold {grid.fold}, "
                              f"seed {grid.seed}; lr and clip value snap to the nearest grid point)</span>")
    return widgets.VBox([note, _stack(model_children, model, links)]), links
