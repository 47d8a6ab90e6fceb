"""Config loading: defaults, backward compatibility, and errors that name the key path."""
from pathlib import Path

import pytest

from prot_lib.training.config import (ALL_FIXES, CONFIG_DIR, FIXES, ConfigError, config_from_dict, fix_overlay,
                                      load_config, named_config, reproduction_config)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_writeup_defaults():
    cfg = config_from_dict({})
    assert cfg.training.lr == 1e-4
    assert cfg.training.gradient_clip_val == 1.0
    assert cfg.training.clip_via == "trainer"
    assert cfg.training.sanitize == "off"
    assert cfg.model.norm is None


def test_old_writeup_file_loads_and_reads_1e_minus_4_string(tmp_path):
    # The write-up's own YAML: `lr: 1e-4` is a *string* for PyYAML (YAML 1.1 floats need a dot).
    p = write(tmp_path, "training:\n  lr: 1e-4\n  weight_decay: 0.0\n  gradient_clip_val: 1.0\n  loss_fn: \"mse\"\n")
    import yaml
    assert yaml.safe_load(p.read_text())["training"]["lr"] == "1e-4"
    cfg = load_config(p)
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.training.k_fold == 5 and cfg.training.max_epochs == 10


def test_old_file_without_clip_key_gets_default(tmp_path):
    cfg = load_config(write(tmp_path, "training:\n  lr: 0.001\n"))
    assert cfg.training.gradient_clip_val == 1.0


@pytest.mark.parametrize("text, key", [
    ("training:\n  lrr: 0.1\n", "training.lrr"),
    ("training:\n  lr: fast\n", "training.lr"),
    ("training:\n  warmup:\n    gamma: -1\n", "training.warmup.gamma"),
    ("model:\n  norm: batchnorm\n", "model.norm"),
    ("training:\n  loss_fn: hinge\n", "training.loss_fn"),
    ("modle:\n  d_model: 3\n", "modle"),
    ("training:\n  k_fold: 1\n", "training.k_fold"),
])
def test_bad_keys_and_types_name_the_key_path(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"  {key}:" in msg
    assert str(p) in msg


def test_unknown_loss_fn_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.loss_fn: Input should be 'mse', 'mae' or 'huber'"):
        load_config(write(tmp_path, "training:\n  loss_fn: hinge\n"))


def test_yaml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_config(write(tmp_path, "training: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_sanitize_accepts_bool_and_clip_zero_disables():
    cfg = config_from_dict({"training": {"sanitize": True, "gradient_clip_val": 0}})
    assert cfg.training.sanitize == "writeup"
    assert not cfg.training.clip_enabled
    assert not config_from_dict({"training": {"gradient_clip_val": None}}).training.clip_enabled


def test_every_shipped_config_and_fix_validates():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"ishigami_unmitigated", "dyconex_unmitigated"} <= set(names)
    for n in names:
        named_config(n)
    for ds in ("ishigami", "dyconex"):
        for fix in FIXES:
            reproduction_config(ds, fix)


def test_each_fix_is_one_switch():
    base = reproduction_config("ishigami", "none")
    assert base.training.gradient_clip_val is None  # the reproduction starts with every fix off
    assert reproduction_config("ishigami", "clip").training.gradient_clip_val == 1.0
    assert reproduction_config("ishigami", "dict-clip").training.clip_via == "configure_optimizers"
    assert reproduction_config("ishigami", "sanitize").training.sanitize == "writeup"
    assert reproduction_config("ishigami", "warmup").training.warmup.enabled
    assert reproduction_config("ishigami", "layernorm").model.norm == "layernorm"
    assert reproduction_config("dyconex", "normalize").data.normalize
    allc = reproduction_config("dyconex", "all")
    assert allc.model.norm == "layernorm" and allc.training.sanitize == "writeup" and allc.data.normalize
    assert set(ALL_FIXES) < set(FIXES)
    with pytest.raises(ConfigError, match="unknown fix 'magic'"):
        fix_overlay("magic")
    with pytest.raises(ConfigError, match="available: "):
        named_config("nope")


def test_updated_with_dotted_keys_validates():
    cfg = config_from_dict({}).updated({"training.lr": 0.5, "model": {"n_layers": 2}})
    assert cfg.training.lr == 0.5 and cfg.model.n_layers == 2
    with pytest.raises(ConfigError, match="training.lr"):
        cfg.updated({"training.lr": -1})
