"""prot_lib.viz.notebook.setup_chapter: what every chapter's setup cell relies on."""
import logging

import pandas as pd
import pytest
import torch

from prot_lib.viz.notebook import LIGHTNING_LOGGERS, setup_chapter


def test_setup_chapter_sets_threads_loggers_and_precision():
    threads, precision = torch.get_num_threads(), pd.get_option("display.precision")
    try:
        setup_chapter(threads=1, precision=5)
        assert torch.get_num_threads() == 1 and pd.get_option("display.precision") == 5
        assert all(logging.getLogger(name).level == logging.WARNING for name in LIGHTNING_LOGGERS)
        assert not logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)
        with pytest.raises(ValueError, match="threads must be >= 1"):
            setup_chapter(threads=0)
    finally:
        torch.set_num_threads(threads)
        pd.set_option("display.precision", precision)
