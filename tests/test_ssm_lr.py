"""``training.ssm_lr_scale``: the SSM parameters (A_log, D, dt_proj) in AdamW groups of their own at
lr * scale; 1.0 leaves the optimizer exactly as it was before the key existed."""
from __future__ import annotations

import pytest
import torch

from prot_lib.models import Mamba
from prot_lib.training import ConfigError, NaNStudyModule, reproduction_config
from prot_lib.training.module import ssm_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SSM_NAMES = ("A_log", "D", "dt_proj.weight", "dt_proj.bias")


def module(**training):
    cfg = reproduction_config("ishigami")  # stacks: 2 x 4 Mamba blocks, lr 2e-2, weight_decay 0
    cfg = cfg.updated({f"training.{k}": v for k, v in training.items()})
    torch.manual_seed(0)
    return NaNStudyModule(cfg, n_features=1)


def optimizer(m):
    out = m.configure_optimizers()
    return out["optimizer"], out.get("lr_scheduler")



def test_default_scale_keeps_the_two_groups_of_before():
    m = module(weight_decay=0.1)
    assert m.config.training.ssm_lr_scale == 1.0
    opt, _ = optimizer(m)
    names = [n for n, p in m.named_parameters()]
    # the rule the optimizer followed before the key existed: decay on weights, none on biases, A_log, D
    exempt = [n for n in names if n.endswith("bias") or n.endswith(".A_log") or n.endswith(".D")]
    assert [g["names"] for g in opt.param_groups] == [[n for n in names if n not in exempt], exempt]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [2e-2, 2e-2]
    assert not any("ssm" in g for g in opt.param_groups)


def test_scale_puts_every_ssm_parameter_in_its_own_groups_at_the_scaled_lr():
    m = module(ssm_lr_scale=0.1, weight_decay=0.1)
    opt, _ = optimizer(m)
    groups = opt.param_groups
    assert len(groups) == 4
    n_blocks = sum(isinstance(x, Mamba) for x in m.modules())
    assert n_blocks == 8
    assert [g["lr"] for g in groups] == pytest.approx([2e-2, 2e-2, 2e-3, 2e-3])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.0, 0.1]   # each SSM parameter keeps its decay
    ssm_exempt, ssm_decayed = groups[2]["names"], groups[3]["names"]
    assert len(ssm_exempt) == 3 * n_blocks and all(n.endswith(("A_log", ".D", "dt_proj.bias")) for n in ssm_exempt)
    assert len(ssm_decayed) == n_blocks and all(n.endswith("dt_proj.weight") for n in ssm_decayed)
    # every parameter exactly once; the SSM ones exactly those ssm_parameters names
    all_names = [n for g in groups for n in g["names"]]
    assert sorted(all_names) == sorted(n for n, _ in m.named_parameters())
    assert {id(p) for g in groups[2:] for p in g["params"]} == {id(p) for p in ssm_parameters(m)}
    assert not any(n.split(".")[-1] in ("A_log", "D") or "dt_proj" in n for g in groups[:2] for n in g["names"])


def test_first_adam_step_moves_ssm_parameters_by_the_scaled_lr():
    """Adam's first update is lr * m / (sqrt(v) + eps) = lr * sign(g) (up to eps): the largest change of
    each group's parameters is its lr."""
    for scale in (1.0, 0.1):
        m = module(ssm_lr_scale=scale)
        opt, _ = optimizer(m)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        x, y = torch.randn(16, 3, 1), torch.randn(16) + 3.5
        m.raw_loss((x, y)).backward()
        opt.step()
        moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in m.named_parameters()}
        ssm = max(v for n, v in moved.items() if "dt_proj" in n or n.endswith(("A_log", ".D")))
        other = max(v for n, v in moved.items() if not ("dt_proj" in n or n.endswith(("A_log", ".D"))))
        assert ssm == pytest.approx(2e-2 * scale, rel=1e-2)  # |g| >> eps for the largest mover
        assert other == pytest.approx(2e-2, rel=1e-2)


def test_warmup_scales_every_group_alike():
    m = module(ssm_lr_scale=0.25, **{"warmup.enabled": True, "warmup.start_factor": 0.1, "warmup.total_iters": 4,
                                     "warmup.interval": "step"})
    opt, sched = optimizer(m)
    sched = sched["scheduler"]
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for lrs in seen:  # the SSM groups stay at 0.25 x the others through warmup and after
        assert lrs[2] == pytest.approx(0.25 * lrs[0]) and lrs[1] == pytest.approx(lrs[0])
    assert seen[0][0] == pytest.approx(2e-3) and seen[-1][0] == pytest.approx(2e-2)
    assert seen[0][2] == pytest.approx(5e-4) and seen[-1][2] == pytest.approx(5e-3)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_non_positive_scale_is_a_config_error_naming_the_key(bad):
    with pytest.raises(ConfigError, match="training.ssm_lr_scale"):
        reproduction_config("ishigami").updated({"training.ssm_lr_scale": bad})
