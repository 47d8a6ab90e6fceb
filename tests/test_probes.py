"""prot_lib.diagnostics.probes: where the first non-finite number is born, per step and per scan."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prot_lib.data import load_dataset
from prot_lib.diagnostics.faults import InjectFault
from prot_lib.diagnostics.probes import StepProbe, first_nonfinite_event, probe_step, tensor_summary
from prot_lib.training import reproduction_config, run_kfold
from prot_lib.training.module import NaNStudyModule


def test_tensor_summary_counts_what_is_not_finite():
    s = tensor_summary(torch.tensor([1.0, -3.0, float("nan"), float("inf")]))
    assert s == {"finite": False, "n_nan": 1, "n_inf": 1, "absmax_finite": 3.0}
    assert tensor_summary(torch.tensor([1, 2])) is None and tensor_summary("x") is None


def test_probe_step_finds_the_scan_where_raw_dyconex_overflows():
    # raw Dyconex scales (Unix timestamps ~1.7e9) with the NaN inputs zeroed: no NaN goes in, one comes
    # out of a selective scan (docs/findings.md section 3: layer 1's forward scan)
    torch.manual_seed(0)
    dy = load_dataset("dyconex")
    x = torch.nan_to_num(dy.x[:8], nan=0.0)
    model = NaNStudyModule(reproduction_config("dyconex"), n_features=x.shape[-1]).model
    probe = probe_step(model, lambda: F.mse_loss(model(x), torch.zeros(8)))
    first = probe["first_nonfinite"]
    assert first["kind"] == "scan" and first["module"].endswith(".selective_scan")
    assert first["born_here"] and first["non_finite"] == "output"
    assert all(v is None or v["finite"] for v in first["input"].values())
    assert first["output"]["n_nan"] + first["output"]["n_inf"] > 0
    scans = [e for e in probe["events"] if e["kind"] == "scan"]
    assert len(scans) == 2 * 4  # two directions x four layers, in execution order
    assert probe["n_params_nonfinite_grad"] > 0 and probe["first_param_nonfinite_grad"] is not None
    assert not any("_scan" in vars(m) for m in model.modules())  # the wrappers are gone afterwards


def test_step_probe_names_the_module_of_a_poisoned_weight(tmp_path):
    cfg = reproduction_config("ishigami")
    probe = StepProbe()
    fault = InjectFault(step=2, target="weight", param="model.head.weight")
    res = run_kfold(cfg, folds=[0], max_steps=4, run_dir=tmp_path, progress=False, callbacks=[fault, probe])
    rows = {r["step"]: r for r in probe.rows}
    assert sorted(rows) == [0, 1, 2, 3]
    assert rows[1]["fwd_first"] is None and rows[1]["params_finite_after"] and rows[1]["update_norm"] > 0
    # step 2 runs its forward on the poisoned head: born there, from a finite input
    assert rows[2]["fwd_first"] == "model.head" and rows[2]["fwd_first_input_finite"]
    assert rows[2]["bwd_nonfinite_order"] and not rows[2]["params_finite_after"]
    assert rows[1]["output_absmax"]["model"] > 0 and res.fold_summary(0)["first_nonfinite_step"] == 2


def test_first_nonfinite_event_can_skip_bad_inputs():
    ok = {"finite": True, "n_nan": 0, "n_inf": 0, "absmax_finite": 1.0}
    bad = {"finite": False, "n_nan": 1, "n_inf": 0, "absmax_finite": None}
    events = [{"module": "a", "kind": "Linear", "input": bad, "output": ok},
              {"module": "b", "kind": "Linear", "input": ok, "output": bad}]
    assert first_nonfinite_event(events)["module"] == "a"
    b = first_nonfinite_event(events, outputs_only=True)
    assert b["module"] == "b" and b["born_here"]
