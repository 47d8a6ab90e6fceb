"""Read back a checkpoint of a :class:`NaNStudyModule` run.

Checkpoints are written by :class:`prot_lib.callbacks.FiniteCheckpoint` (finite and atomic) when
``training.checkpoint.enabled`` is true (off by default: runs write no checkpoint files unless asked;
:mod:`prot_lib.training.safety_nets` builds the callback).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from .module import NaNStudyModule


def load_checkpoint(path: Union[str, Path]) -> NaNStudyModule:
    """A checkpoint written by a ``NaNStudyModule`` run, as a ``NaNStudyModule`` in eval mode.

    Rebuilt from the checkpoint's hyper-parameters (``config`` as a dict and ``n_features``, what
    ``save_hyperparameters`` stored) and its ``state_dict``; the global RNG is left as it was.

    Raises:
        FileNotFoundError: no such file.
        KeyError: not a ``NaNStudyModule`` checkpoint (no ``hyper_parameters.config``).
        prot_lib.training.ConfigError: its config does not validate with this version of the library.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    with torch.random.fork_rng(devices=[]):  # building the module draws initial weights
        module = NaNStudyModule(hp["config"], n_features=int(hp["n_features"]))
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
