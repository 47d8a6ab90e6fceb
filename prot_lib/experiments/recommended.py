"""The configuration the book recommends (chapter 9), as YAML: ``prot_lib/configs/recommended/``.

``common.yaml`` holds the keys every dataset gets, each with the chapter that measured why;
``<dataset>.yaml`` the learning rate and schedule of one dataset. :func:`recommended_config` applies
both on top of the dataset's shipped reproduction.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import yaml

from ..training.config import CONFIG_DIR, ConfigError, RunConfig, deep_merge, reproduction_config

__all__ = ["RECOMMENDED_DIR", "recommended_overrides", "recommended_config", "recommended_yaml"]

RECOMMENDED_DIR = CONFIG_DIR / "recommended"


def _read(path: Path) -> Dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {err}") from None


def recommended_overrides(dataset: str) -> Dict[str, Any]:
    """The nested keys the recommendation sets for ``dataset``: ``common.yaml`` merged with
    ``<dataset>.yaml`` (when there is one).

    Raises:
        ConfigError: a file is not valid YAML.
    """
    out = _read(RECOMMENDED_DIR / "common.yaml")
    own = RECOMMENDED_DIR / f"{dataset}.yaml"
    return deep_merge(out, _read(own)) if own.is_file() else out


def recommended_config(dataset: str, overrides: Optional[Mapping[str, Any]] = None) -> RunConfig:
    """``reproduction_config(dataset)`` with :func:`recommended_overrides` and ``overrides`` (dotted
    keys) applied; named ``<dataset>_recommended``.

    Raises:
        ConfigError: unknown dataset or a bad override (names the key).
    """
    cfg = reproduction_config(dataset).updated(recommended_overrides(dataset))
    return cfg.updated({**dict(overrides or {}), "name": f"{dataset}_recommended"})


def recommended_yaml(dataset: str) -> str:
    """The keys :func:`recommended_config` sets, as the YAML a user would put in a config file."""
    return yaml.safe_dump(recommended_overrides(dataset), sort_keys=False)
