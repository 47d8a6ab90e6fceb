"""Sweep specs: the book's sweeps as YAML files in ``prot_lib/configs/sweeps/<name>.yaml``.

A spec is a grid (:func:`~prot_lib.experiments.cells.grid_cells`) plus the name of the analysis that
reads its rows (``kind``)::

    kind: stability-map          # fix-matrix | stability-map | clip-sweep | seed-rates
    description: learning rate x clip setting, chapter 9
    bases:                       # label -> dataset (default: the label), fixes, lrs, settings, seeds,
      ishigami: {folds: [0, 1, 2]}   #   folds, max_steps, or a config file: {config: my.yaml}
      dyconex: {fixes: [normalize], folds: [0, 1]}
    lrs: [1.0e-3, 1.0e-2, 5.0e-2]    # grid-wide axes (a base's own value wins)
    settings: [none, norm 1, autoclip p10, zclip]
    seeds: [0]                   # or a range string: "0-19"
    folds: null                  # null: all k folds
    split_folds: false           # true: one cell per fold
    max_steps: 100               # -1: the config's max_epochs
    extend_epochs: true          # raise max_epochs so that max_steps can be reached
    overrides: {}                # dotted config overrides for every cell
    quick: {...}                 # the same keys, merged over the spec by --quick

Unknown keys, datasets, fixes and clip settings raise :class:`~prot_lib.training.config.ConfigError`
naming the file and the key path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..data import DATASETS
from ..training.config import CONFIG_DIR, FIXES, ConfigError, deep_merge, load_config
from .ablation import ablation_cells
from .cells import Cell, grid_cells, setting_overrides

__all__ = ["SPEC_DIR", "KINDS", "SweepSpec", "BaseEntry", "sweep_names", "load_spec", "spec_cells", "parse_seeds"]

#: where the shipped sweep specs live
SPEC_DIR = CONFIG_DIR / "sweeps"
#: the analyses a spec can ask for (:mod:`prot_lib.experiments.sweeps`)
KINDS = ("fix-matrix", "stability-map", "clip-sweep", "seed-rates", "ablation")


def parse_seeds(value: Union[str, int, List[Any], None]) -> List[Optional[int]]:
    """Seeds from a list, an int, or a range string: ``"0-4,7"`` -> ``[0, 1, 2, 3, 4, 7]``; None stays
    ``[None]`` (the config's seed).

    Raises:
        ValueError: a part that is neither an int nor a range ``a-b``.
    """
    if value is None:
        return [None]
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [None if v is None else int(v) for v in value]
    out: List[Optional[int]] = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition("-")
        if sep and a.strip().lstrip("+").isdigit() and b.strip().isdigit():
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return list(dict.fromkeys(out))


def _check_settings(v: List[Optional[str]]) -> List[Optional[str]]:
    for label in v:
        if label is not None:
            try:
                setting_overrides(label)
            except ConfigError as err:
                raise ValueError(str(err)) from None  # pydantic adds the key path
    return v


def _check_fixes(v: List[Optional[str]]) -> List[Optional[str]]:
    bad = [f for f in v if f is not None and f not in FIXES]
    if bad:
        raise ValueError(f"unknown fixes {bad}; valid: {', '.join(FIXES)}")
    return v


_CHECKS = {"settings": _check_settings, "fixes": _check_fixes}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseEntry(_Strict):
    """One base of the grid; every key left out takes the grid-wide value."""

    dataset: Optional[str] = None
    config: Optional[str] = Field(None, description="a config YAML file used instead of the shipped reproduction")
    fixes: Optional[List[Optional[str]]] = None
    lrs: Optional[List[Optional[float]]] = None
    settings: Optional[List[Optional[str]]] = None
    seeds: Optional[List[Optional[int]]] = None
    folds: Optional[List[int]] = None
    max_steps: Optional[int] = None

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_ranges(cls, v):
        return None if v is None else parse_seeds(v)

    @field_validator("settings", "fixes")
    @classmethod
    def _known_names(cls, v, info):
        return None if v is None else _CHECKS[info.field_name](v)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v):
        if v is not None and v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; valid: {', '.join(DATASETS)}")
        return v


class SweepSpec(_Strict):
    """A validated sweep spec (see the module docstring for the keys)."""

    name: str
    kind: Literal["fix-matrix", "stability-map", "clip-sweep", "seed-rates", "ablation"]
    description: str = ""
    bases: Dict[str, BaseEntry]
    fixes: List[Optional[str]] = [None]
    lrs: List[Optional[float]] = [None]
    settings: List[Optional[str]] = [None]
    seeds: List[Optional[int]] = [None]
    folds: Optional[List[int]] = None
    split_folds: bool = False
    max_steps: int = -1
    extend_epochs: bool = False
    overrides: Dict[str, Any] = {}
    parts: Optional[List[str]] = None              # ablation: the parts (default: all the recommendation sets)
    extra: Dict[str, Dict[str, Any]] = {}         # ablation: label -> overrides (``from: recommended`` allowed)
    variants: Optional[List[str]] = None           # ablation: the labels to run (default: all)
    quick: Dict[str, Any] = {}

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_ranges(cls, v):
        return parse_seeds(v)

    @field_validator("settings", "fixes")
    @classmethod
    def _known_names(cls, v, info):
        return _CHECKS[info.field_name](v)

    @field_validator("bases")
    @classmethod
    def _dataset_labels(cls, v):
        for label, entry in v.items():
            if entry.dataset is None and entry.config is None and label not in DATASETS:
                raise ValueError(f"base {label!r} is not a dataset ({', '.join(DATASETS)}); give dataset: or config:")
        return v


def sweep_names() -> List[str]:
    """The shipped specs, by name (``fix-matrix``, ``stability-map``, ...)."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def load_spec(name: Union[str, Path], quick: bool = False) -> SweepSpec:
    """A shipped spec by name, or any spec file by path; ``quick`` merges its ``quick`` section over it.

    Raises:
        ConfigError: no such spec (lists the shipped names), YAML syntax error, unknown key or bad value
            (names the file and the key path).
    """
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = SPEC_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no sweep spec {str(name)!r}; shipped: {', '.join(sweep_names())}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw.setdefault("name", path.stem)
    if quick:
        raw = deep_merge(raw, raw.get("quick") or {})
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        lines = [f"invalid sweep spec {path}" + (" (--quick)" if quick else "") + ":"]
        for e in err.errors():
            lines.append(f"  {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}")
        raise ConfigError("\n".join(lines)) from None


def spec_cells(spec: SweepSpec) -> List[Cell]:
    """The spec's grid as cells (:func:`~prot_lib.experiments.cells.grid_cells`).

    Raises:
        ConfigError: a base's config file is missing or invalid, or an override is bad.
    """
    if spec.kind == "ablation":  # variants derived from the recommendation, per dataset base
        cells: List[Cell] = []
        for label, entry in spec.bases.items():
            cells += ablation_cells(entry.dataset or label, entry.seeds or spec.seeds,
                                    entry.folds if entry.folds is not None else spec.folds, spec.parts, spec.extra,
                                    spec.variants, spec.max_steps if entry.max_steps is None else entry.max_steps)
        return cells
    bases: Dict[str, Dict[str, Any]] = {}
    for label, entry in spec.bases.items():
        d = entry.model_dump(exclude_unset=True)
        if "config" in d:
            d["config"] = load_config(d["config"])
        bases[label] = d
    return grid_cells(bases, fixes=spec.fixes, lrs=spec.lrs, settings=spec.settings, seeds=spec.seeds,
                      folds=spec.folds, split_folds=spec.split_folds, max_steps=spec.max_steps,
                      extend_epochs=spec.extend_epochs, overrides=spec.overrides)
