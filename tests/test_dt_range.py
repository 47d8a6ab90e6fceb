"""``model.dt_min`` / ``model.dt_max``: the range of every Mamba block's initial step size, one config key.

mamba-ssm's ``Mamba(dt_min=0.001, dt_max=0.1)`` draws softplus(dt_proj.bias) log-uniform in [dt_min,
dt_max] (``mamba_simple.py``); the config passes both to every block of either topology.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from prot_lib.models import Mamba, build_model
from prot_lib.training import ConfigError, config_from_dict
from prot_lib.training.config import ModelConfig


def blocks(model):
    return [m for m in model.modules() if isinstance(m, Mamba)]


@pytest.mark.parametrize("topology", ["stacks", "layers"])
def test_every_block_draws_its_initial_delta_in_the_configured_range(topology):
    torch.manual_seed(0)
    model = build_model(ModelConfig(topology=topology, d_model=8, n_layers=2, dt_min=1e-3, dt_max=1e-2), 3)
    found = blocks(model)
    assert len(found) == 4                                     # two directions x two layers or blocks
    for b in found:
        dt = F.softplus(b.dt_proj.bias.detach().double())
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-2 * (1 + 1e-5)
        assert dt.max() > 3e-3 and dt.min() < 3e-3              # spread over the range, not one value


def test_the_same_draw_as_mamba_ssm_s_arguments():
    # the config key is Mamba(dt_min, dt_max): the same random numbers give the same biases
    torch.manual_seed(1)
    model = build_model({"d_model": 8, "n_layers": 1, "dt_min": 2e-3, "dt_max": 5e-2}, 3)
    torch.manual_seed(1)
    torch.nn.Linear(3, 8)                                       # the embedding's draws come first
    direct = Mamba(8, dt_min=2e-3, dt_max=5e-2)
    torch.testing.assert_close(blocks(model)[0].dt_proj.bias, direct.dt_proj.bias, rtol=0, atol=0)


def test_defaults_are_mamba_ssm_s_and_a_bad_range_names_the_keys():
    cfg = config_from_dict({})
    assert (cfg.model.dt_min, cfg.model.dt_max) == (0.001, 0.1)
    torch.manual_seed(0)
    dt = F.softplus(blocks(build_model(cfg.model, 3))[0].dt_proj.bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5) and dt.max() > 0.03
    with pytest.raises(ConfigError, match="dt_min"):
        config_from_dict({"model": {"dt_min": 0.1, "dt_max": 0.01}})
    with pytest.raises(ConfigError, match="dt_max"):
        config_from_dict({"model": {"dt_max": -1.0}})
    assert math.isclose(config_from_dict({"model": {"dt_min": "1e-3", "dt_max": "1e-2"}}).model.dt_max, 1e-2)
