"""Run configuration: YAML in, validated and typed objects out.

Every fix the write-up proposes is one key here, read in one place:

=========================  ===========================================  =====================================
write-up                   key                                          read by
=========================  ===========================================  =====================================
gradient clipping          ``training.gradient_clip_val`` (+ ``_algorithm``)  ``Trainer(gradient_clip_val=...)`` (``safety_nets``)
the write-up's clip site   ``training.clip_via: configure_optimizers``  ``NaNStudyModule.configure_optimizers``
NaN detection/replacement  ``training.sanitize: writeup``               ``NaNStudyModule._step``
gradient monitoring        ``training.monitor_gradients``               ``NaNStudyModule.on_before_optimizer_step``
learning-rate warmup       ``training.warmup.enabled``                  ``NaNStudyModule.configure_optimizers``
LayerNorm after every      ``model.norm: layernorm`` +                  ``BiMambaStacks.block_step``
Mamba layer (their final   ``model.norm_position: post`` (fix
fix, ``postnorm``)         ``postnorm``)
fallbacks of that fix      ``model.n_layers`` (fewer layers),           ``build_model``
                           ``model.residual`` (residual connections),
                           ``model.d_model`` (smaller d_model)
(ours) mamba-ssm's pre-    ``model.norm: layernorm`` + ``norm_position:  ``BiMambaStacks`` / ``BiMamba``
norm residual blocks       pre`` + ``residual: true`` (fix
(``layernorm``)            ``layernorm``)
smaller learning rate      ``training.lr``                              ``NaNStudyModule.configure_optimizers``
(ours) smaller SSM lr     ``training.ssm_lr_scale``                    ``parameter_groups`` (``configure_optimizers``)
(ours) input normalisation ``data.normalize``                           ``SequenceData.normalized``
(ours) adaptive clipping   ``training.gradient_clip_algorithm`` (autoclip,   ``safety_nets`` -> ``AdaptiveGradientClipping``
                           zclip) + ``autoclip_*``, ``zclip_*``
(ours) data guard          ``training.data_guard``                      ``safety_nets`` -> ``DataGuard``
=========================  ===========================================  =====================================

The model itself: ``model.topology`` (``stacks``: the write-up's two directional stacks, no residual,
no norm, concatenated; ``layers``: a Vim-style residual stack), read by
:func:`prot_lib.models.build_model`; see :class:`ModelConfig`.

Guards of non-finite training (the callbacks of :mod:`prot_lib.callbacks`; their defaults keep the
write-up's behaviour): ``training.on_nonfinite`` (continue | stop | skip | rollback, with
``max_consecutive_skips``, ``rollback_every``, ``rollback_lr_factor``) -> ``NonFiniteGuard``;
``training.checkpoint.*`` (finite, atomic checkpoints, off by default) -> ``FiniteCheckpoint``;
``training.log_param_grad_norms`` -> ``GradNormMonitor``. All are translated in one place,
:func:`prot_lib.training.safety_nets.safety_nets`.

The write-up promises that old config files keep working: every new key has a default, and a file
holding only ``training: {lr, weight_decay, gradient_clip_val, loss_fn}`` loads. Unknown keys and bad
types raise :class:`ConfigError` naming the key path (``training.warmup.gamma``).

Note on YAML: PyYAML reads ``lr: 1e-4`` (no dot) as the *string* "1e-4" (YAML 1.1 floats need a
dot). The write-up's own example is written that way, so numbers given as strings are converted
(pydantic's lax mode) rather than rejected.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..models.bimamba import TOPOLOGIES

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _fix_names() -> tuple:
    """"none", then one name per overlay file ``configs/fixes/<name>.yaml`` (sorted), then "all".
    Adding a fix is adding its YAML file; nothing else lists the fixes."""
    return ("none", *sorted(p.stem for p in (CONFIG_DIR / "fixes").glob("*.yaml")), "all")


#: every name ``fix_overlay`` and ``reproduction_config`` accept (derived from ``configs/fixes/*.yaml``)
FIXES = _fix_names()
#: the fixes combined by ``--fix all``: the write-up's (its final LayerNorm fix is ``postnorm``;
#: dict-clip is its broken variant of clip) plus our input normalisation
ALL_FIXES = ("clip", "sanitize", "warmup", "postnorm", "normalize")


class ConfigError(ValueError):
    """A configuration file or dict is invalid; the message names the file and the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WarmupConfig(_Strict):
    """LinearLR warmup then StepLR decay, chained by SequentialLR (the write-up's 'Alternative 1').

    ``start_factor``, ``total_iters`` and ``step_size`` count in ``interval`` units: optimizer steps
    for ``interval: step`` (what warmup is meant to be), epochs for ``interval: epoch`` (Lightning's
    default for a scheduler, and the pitfall shown in chapter 7).
    """

    enabled: bool = False
    start_factor: float = Field(0.1, gt=0.0, le=1.0)
    total_iters: int = Field(100, ge=1)
    step_size: int = Field(1000, ge=1)
    gamma: float = Field(0.5, gt=0.0, le=1.0)
    interval: Literal["step", "epoch"] = "step"


class CheckpointConfig(_Strict):
    """Finite, atomic checkpoints (:class:`prot_lib.callbacks.FiniteCheckpoint`); off by default, so runs
    write no checkpoint files unless asked.

    ``monitor`` is a logged metric (``val_loss``, ``train_loss``, ``val_rmse``) or null (keep the
    latest); ``every_n_train_steps`` null saves after each validation epoch, N saves every N
    optimizer steps. Files go to ``<run_dir>/fold<k>/checkpoints/``.
    """

    enabled: bool = False
    monitor: Optional[str] = "val_loss"
    mode: Literal["min", "max"] = "min"
    save_top_k: int = Field(1, ge=-1)
    save_last: bool = True
    every_n_train_steps: Optional[int] = Field(None, ge=1)


class DataConfig(_Strict):
    """Which dataset and how it is prepared."""

    name: Literal["ishigami", "dyconex", "dyconex_long", "dyconex_long_ci"] = "ishigami"
    data_dir: Optional[str] = None
    normalize: bool = False


class ModelConfig(_Strict):
    """Arguments of :class:`prot_lib.models.S6Regressor` (mamba-ssm's names), built by
    :func:`prot_lib.models.build_model`. Defaults are the write-up's model before its fix.

    ``topology`` picks the bidirectional layout: ``stacks`` (the write-up's: two independent
    directional stacks of ``n_layers`` plain Mamba blocks, concatenated to 2 * d_model) or ``layers``
    (Vim-style: one residual stream, each layer adds fwd + bwd). ``residual`` and ``norm_position``
    null mean the topology's own choice (stacks: no residual, a norm goes after each block; layers:
    residual, pre-norm). With stacks, ``norm_position: post`` is a norm after every block (the
    write-up's final fix, ``--fix postnorm``), ``pre`` mamba-ssm's pre-norm blocks with a final norm
    (``--fix layernorm``, which also sets ``residual: true``).
    ``combine`` is read by ``layers`` only, ``dropout`` by ``stacks`` only.
    """

    topology: Literal["stacks", "layers"] = "stacks"
    d_model: int = Field(16, ge=1)
    n_layers: int = Field(4, ge=1, description="Mamba blocks per stack (stacks) or bidirectional layers")
    d_state: int = Field(16, ge=1)
    d_conv: int = Field(4, ge=1)
    expand: int = Field(2, ge=1)
    norm: Optional[Literal["layernorm", "rmsnorm"]] = None
    norm_position: Optional[Literal["pre", "post"]] = Field(
        None, description="null: the topology's placement (stacks post, layers pre)")
    residual: Optional[bool] = Field(None, description="null: the topology's default (stacks False, layers True)")
    combine: Literal["add", "mean"] = "add"
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="after each block (stacks only)")
    pooling: Literal["mean", "last"] = "mean"
    backend: Literal["auto", "torch", "mamba_ssm"] = "auto"
    # mamba-ssm's Mamba(dt_min, dt_max): the initial step size softplus(dt_proj.bias) of every block is
    # drawn log-uniform in [dt_min, dt_max] (chapter 11 narrows it)
    dt_min: float = Field(0.001, gt=0.0, description="lower end of the initial delta range (every Mamba block)")
    dt_max: float = Field(0.1, gt=0.0, description="upper end of the initial delta range (every Mamba block)")

    @field_validator("norm", mode="before")
    @classmethod
    def _none_strings(cls, v: Any) -> Any:
        return None if v in ("none", "None", "null", False) else v

    @model_validator(mode="after")
    def _dt_range(self) -> "ModelConfig":
        if self.dt_min >= self.dt_max:
            raise ValueError(f"model.dt_min ({self.dt_min}) must be below model.dt_max ({self.dt_max})")
        return self


class TrainingConfig(_Strict):
    """Optimisation settings; the write-up's keys keep the write-up's names and defaults."""

    lr: float = Field(1e-4, gt=0.0, description="learning rate of AdamW, per optimizer step")
    # The SSM parameters (A_log, D, dt_proj.weight, dt_proj.bias of every Mamba block) set delta and
    # exp(delta * A); many Mamba recipes train them at a smaller lr. 1.0 keeps one lr for all.
    ssm_lr_scale: float = Field(1.0, gt=0.0, description="lr of the SSM parameters (A_log, D, dt_proj) = "
                                "lr * ssm_lr_scale, in their own AdamW param groups (NaNStudyModule."
                                "configure_optimizers); warmup/StepLR scale every group alike")
    weight_decay: float = Field(0.0, ge=0.0)
    gradient_clip_val: Optional[float] = Field(1.0, ge=0.0, description="0 or null disables clipping")
    gradient_clip_algorithm: Literal["norm", "value", "autoclip", "zclip"] = Field(
        "norm", description="norm/value: Lightning's, at gradient_clip_val; autoclip/zclip: adaptive "
        "(prot_lib.callbacks.AdaptiveGradientClipping), gradient_clip_val then not given to the Trainer")
    clip_via: Literal["trainer", "configure_optimizers"] = "trainer"
    loss_fn: Literal["mse", "mae", "huber"] = "mse"
    max_epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    k_fold: int = Field(5, ge=2)
    seed: int = 0
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    sanitize: Literal["off", "writeup"] = "off"
    monitor_gradients: bool = False
    log_param_grad_norms: bool = False
    mask_missing_targets: bool = False
    # adaptive clipping (read only when gradient_clip_algorithm is autoclip / zclip)
    autoclip_percentile: float = Field(10.0, gt=0.0, le=100.0, description="AutoClip's p (paper: 10)")
    zclip_z_thresh: float = Field(2.5, gt=0.0, description="ZClip's z-score threshold (paper: 2.5)")
    zclip_alpha: float = Field(0.97, gt=0.0, lt=1.0, description="ZClip's EMA decay (paper: 0.97)")
    zclip_warmup_steps: int = Field(25, ge=1, description="ZClip's warmup, optimizer steps (paper: 25)")
    data_guard: bool = Field(False, description="fail on a non-finite input/target, naming sample and "
                             "feature (prot_lib.callbacks.DataGuard)")

    # What a step with a non-finite loss or gradient does (prot_lib.callbacks.NonFiniteGuard):
    # "continue" is the write-up's behaviour (the optimizer steps anyway; the book's reproductions);
    # "stop" raises NonFiniteTrainingError with an autopsy; "skip" drops that step's update, like
    # AMP's GradScaler; "rollback" restores the last good weights and optimizer state, multiplies
    # the lr by rollback_lr_factor and drops the step (the PaLM recipe).
    on_nonfinite: Literal["continue", "stop", "skip", "rollback"] = "continue"
    max_consecutive_skips: int = Field(10, ge=1, description="skip/rollback: abort after this many "
                                       "non-finite steps in a row")
    rollback_every: int = Field(1, ge=1, description="rollback: keep a last-good copy every N finite optimizer steps")
    rollback_lr_factor: float = Field(0.5, gt=0.0, le=1.0, description="rollback: lr multiplier per rollback")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @field_validator("sanitize", mode="before")
    @classmethod
    def _sanitize_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return "writeup" if v else "off"
        return v

    @property
    def clip_enabled(self) -> bool:
        return bool(self.gradient_clip_val)

    @property
    def adaptive_clip(self) -> bool:
        """True for autoclip/zclip: clipped by the module itself, never by ``Trainer(gradient_clip_val=...)``
        (Lightning accepts only "norm" and "value")."""
        return self.gradient_clip_algorithm in ("autoclip", "zclip")


class RunConfig(_Strict):
    """A whole run: ``name``, ``data``, ``model``, ``training``."""

    name: str = "run"
    description: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def updated(self, overrides: Mapping[str, Any]) -> "RunConfig":
        """A copy with nested ``overrides`` merged in (validated), e.g. ``{"training": {"lr": 1e-3}}``
        or dotted keys ``{"training.lr": 1e-3}``."""
        return config_from_dict(deep_merge(self.to_dict(), _undot(overrides)), source="overrides")


def _undot(d: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, value in d.items():
        parts = str(key).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _undot(value) if isinstance(value, Mapping) else value
    return out


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict:
    """Recursively merge ``overlay`` into a copy of ``base`` (overlay wins)."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = f" (got {e['input']!r})" if e.get("type") != "missing" and "input" in e else ""
        lines.append(f"  {path}: {e['msg']}{got}")
    return "\n".join(lines)


def config_from_dict(d: Optional[Mapping[str, Any]], source: str = "<dict>") -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`.

    Raises:
        ConfigError: unknown key or bad type/value; the message names ``source`` and each key path.
    """
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping, got {type(d).__name__}")
    try:
        return RunConfig.model_validate(dict(d))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: Union[str, Path]) -> RunConfig:
    """Read a YAML file with ``yaml.safe_load`` and validate it.

    Raises:
        ConfigError: missing file, YAML syntax error, unknown key or bad type (names file and key path).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {err}") from None
    return config_from_dict(raw, source=str(path))


def _read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def named_config(name: str) -> RunConfig:
    """A config shipped in ``prot_lib/configs/`` by its stem, e.g. ``"ishigami_unmitigated"``.

    Raises:
        ConfigError: no such config (lists the available names).
    """
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no shipped config named {name!r}; available: {', '.join(names)}")
    return load_config(path)


def fix_overlay(fix: str) -> dict:
    """The overrides one fix applies (``prot_lib/configs/fixes/<fix>.yaml``); ``all`` merges
    :data:`ALL_FIXES`; ``none`` is empty.

    Raises:
        ConfigError: unknown fix name (lists the valid ones).
    """
    if fix not in FIXES:
        raise ConfigError(f"unknown fix {fix!r}; valid: {', '.join(FIXES)}")
    if fix == "none":
        return {}
    if fix == "all":
        merged: dict = {}
        for f in ALL_FIXES:
            merged = deep_merge(merged, fix_overlay(f))
        return merged
    return _read_yaml(CONFIG_DIR / "fixes" / f"{fix}.yaml")


def reproduction_datasets() -> tuple:
    """The datasets with a shipped reproduction, ``prot_lib/configs/<dataset>_unmitigated.yaml``:
    ("dyconex", "dyconex_long", "dyconex_long_ci", "ishigami")."""
    return tuple(sorted(p.stem[: -len("_unmitigated")] for p in CONFIG_DIR.glob("*_unmitigated.yaml")))


def topology_overrides(topology: str) -> dict:
    """Dotted overrides that swap a config's BiMamba to ``topology`` with that topology's own residual
    default: ``{"model.topology": topology, "model.residual": None}`` (``layers``: residual stream;
    ``stacks``: the write-up's plain stacks). For APIs that take ``overrides`` (sweeps, probes, widgets).

    Raises:
        ConfigError: unknown topology (lists the valid ones).
    """
    if topology not in TOPOLOGIES:
        raise ConfigError(f"unknown topology {topology!r}; valid: {', '.join(TOPOLOGIES)}")
    return {"model.topology": topology, "model.residual": None}


def reproduction_config(dataset: str, fix: str = "none", topology: Optional[str] = None) -> RunConfig:
    """The shipped unmitigated config of ``dataset`` with one fix (or all) applied on top.

    ``dataset`` is one of :func:`reproduction_datasets`: ``ishigami`` and ``dyconex`` (the write-up's
    two reports), ``dyconex_long`` (the write-up's scale: L 1023, d_model 100, batch 50, 4 layers) and
    ``dyconex_long_ci`` (the same mechanism at L 99, for CI).

    ``topology`` (None: the file's, ``stacks`` in every shipped reproduction) swaps the BiMamba before
    the fix is applied: ``"layers"`` gives the Vim-style residual stack with its own residual default
    (``model.residual: null``), the model several chapters use for lr-driven divergence; everything
    else in the file is kept.

    Raises:
        ConfigError: unknown dataset, fix or topology (lists the valid ones).
    """
    valid = reproduction_datasets()
    if dataset not in valid:
        raise ConfigError(f"unknown dataset {dataset!r}; valid: {', '.join(valid)}")
    base = _read_yaml(CONFIG_DIR / f"{dataset}_unmitigated.yaml")
    if topology is not None:
        swap = topology_overrides(topology)
        if topology != base.get("model", {}).get("topology", "stacks"):
            base = deep_merge(base, {"model": {k.split(".", 1)[1]: v for k, v in swap.items()}})
    cfg = config_from_dict(deep_merge(base, fix_overlay(fix)), source=f"{dataset}_unmitigated.yaml + fix {fix}"
                           + (f" + topology {topology}" if topology else ""))
    if fix != "none":
        cfg = cfg.updated({"name": f"{dataset}_{fix}"})
    return cfg
