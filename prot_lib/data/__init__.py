"""What goes in: the Ishigami benchmark and a SYNTHETIC stand-in for the Dyconex
PCB process-chain data, as raw token sequences (``SequenceData``), plus the honest fix
for their raw scales (``SequenceData.normalized``).

    from prot_lib.data import load_dataset
    raw = load_dataset("dyconex")          # x (600, 18, 11): Pa, Unix s, NaN ...
    long = load_dataset("dyconex_long")    # x (250, 1023, 15): degC, bar, min; generated
    fixed = raw.normalized(train_idx)      # standardised on the training rows only

Files and their card: ``data/README.md``. Regenerate: ``python -m prot_lib.data.generate``.
"""

from .base import DataError, SequenceData
from .catalog import DATASETS, load_dataset
from .dyconex import generate_dyconex, load_dyconex
from .dyconex_long import generate_dyconex_long, load_dyconex_long
from .guards import GuardedDataset, check_finite_batch
from .ishigami import (
    ISHIGAMI_MEAN,
    ISHIGAMI_SOBOL,
    ISHIGAMI_VARIANCE,
    generate_ishigami,
    ishigami,
    load_ishigami,
    sobol_indices_salib,
)
from .normalize import standardize

__all__ = [
    "DATASETS",
    "DataError",
    "GuardedDataset",
    "ISHIGAMI_MEAN",
    "ISHIGAMI_SOBOL",
    "ISHIGAMI_VARIANCE",
    "SequenceData",
    "check_finite_batch",
    "generate_dyconex",
    "generate_dyconex_long",
    "generate_ishigami",
    "ishigami",
    "load_dataset",
    "load_dyconex",
    "load_dyconex_long",
    "load_ishigami",
    "sobol_indices_salib",
    "standardize",
]
