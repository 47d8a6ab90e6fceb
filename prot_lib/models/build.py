"""One place that turns a run's ``model:`` settings into a module.

``build_model(config.model, n_features)`` is what the Lightning module calls; a notebook or a script
that wants the same network without Lightning calls it too. It reads the settings by name and does
not import the config package (the config layer sits above the models), so any object with the
attributes of :class:`prot_lib.training.config.ModelConfig`, or a plain dict with its keys, works.
"""
from __future__ import annotations

from typing import Any, Mapping

from .bimamba import S6Regressor

#: the keys read, with the value used when a dict leaves one out (ModelConfig's defaults)
MODEL_KEYS = {
    "topology": "stacks", "d_model": 16, "n_layers": 4, "d_state": 16, "d_conv": 4, "expand": 2,
    "norm": None, "norm_position": None, "residual": None, "combine": "add", "dropout": 0.0,
    "pooling": "mean", "backend": "auto", "dt_min": 0.001, "dt_max": 0.1,
}


def build_model(model_config: Any, n_features: int) -> S6Regressor:
    """The regressor described by ``model_config``.

    Args:
        model_config: a :class:`~prot_lib.training.config.ModelConfig` (or any object with its
            attributes), or a mapping with some of :data:`MODEL_KEYS` (missing keys take
            ModelConfig's defaults).
        n_features: F, the width of each input token x: (batch, L, F).

    Returns:
        :class:`S6Regressor`: (batch, L, F) -> (batch,).

    Raises:
        KeyError: a mapping with a key that is not a model setting (names the key).
        ValueError: a setting outside its allowed values, or one the topology does not have
            (raised by :class:`S6Regressor`, naming the argument).
    """
    if isinstance(model_config, Mapping):
        unknown = sorted(set(model_config) - set(MODEL_KEYS))
        if unknown:
            raise KeyError(f"unknown model setting(s) {unknown}; known: {sorted(MODEL_KEYS)}")
        settings = {**MODEL_KEYS, **model_config}
    else:
        settings = {k: getattr(model_config, k, default) for k, default in MODEL_KEYS.items()}
    return S6Regressor(n_features=n_features, **settings)
