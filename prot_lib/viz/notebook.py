"""One call for what every chapter's setup cell does (issue 10: thin notebooks).

:func:`setup_chapter` sets the things a chapter needs to run the same way on a laptop, in CI and in the
book build: one torch thread (the runs are small; more threads only add scheduling noise and change
summation order), Lightning's info banners off ("GPU available: False ..." once per fold), the book's
plot style, and pandas' display precision.
"""
from __future__ import annotations

import logging

import pandas as pd
import torch

from .plots import set_style

__all__ = ["setup_chapter"]

#: the loggers whose INFO lines (device banners, tips, "max_steps reached") clutter a chapter
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


def setup_chapter(threads: int = 1, precision: int = 3) -> None:
    """Prepare a chapter's kernel: ``torch.set_num_threads(threads)``, Lightning's loggers at WARNING,
    :func:`prot_lib.viz.plots.set_style`, ``pd.set_option("display.precision", precision)``.

    Args:
        threads: torch intra-op threads (>= 1).
        precision: decimals pandas shows for floats.

    Raises:
        ValueError: ``threads`` < 1 or ``precision`` < 0.
    """
    if threads < 1 or precision < 0:
        raise ValueError(f"threads must be >= 1 and precision >= 0, got {threads}, {precision}")
    torch.set_num_threads(threads)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    set_style()
    pd.set_option("display.precision", precision)
