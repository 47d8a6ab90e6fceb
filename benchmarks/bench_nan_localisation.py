"""Which tool names where a NaN inside a Mamba block was born, and at what cost? One process, one thread.

Cases (each a model, a batch, and the true birth place, known by construction or checked against the
reference scan :func:`prot_lib.models.selective_scan.selective_scan_reference`, as in
``tests/test_scan_autopsy.py``):

- ``nan_dt_proj_bias``: a small model (Linear embedding -> Mamba -> Linear head) with NaN planted in
  ``mamba.dt_proj.bias[5]``, a parameter the block uses functionally. Truth: ``dt_proj.bias``, channel 5.
- ``nan_D``: the same model with NaN in ``mamba.D[7]``. Truth: ``D``, channel 7.
- ``h_overflow``: one Mamba block whose state only accumulates (delta = 0.001, C and D zeroed) fed an input
  of scale 1e21. Truth: the state h_t at t = 34 (checked: the reference loop's last state is finite after 34
  steps and not after 35).
- ``dyconex_long_ci``: the write-up-scale CI reproduction, fold 1 at initialisation
  (``prot_lib.training.fold_start``). Truth: inside ``bimamba.forward_layers.3``'s scan, the first step
  at which the reference scan's output is non-finite, and the quantity there (delta*B*u: delta*B overflows to
  -inf and u is -0, inf * 0 = NaN).

Tools, each given the step to diagnose (forward, MSE loss, backward) as a user would run it:

- ``ours``: :func:`prot_lib.diagnostics.autopsy` of :func:`capture_step` (the module trace, the gradient
  norms, and the scan autopsy of the block around the first non-finite value: ``report.scan``); also
  ``scan_only``: :func:`scan_autopsy` of the block alone, on its input.
- ``detect_anomaly``: ``torch.autograd.detect_anomaly()`` around forward and backward; it raises at the
  first backward function returning NaN; recorded: that function's name (from the error message).
- ``sherlorch`` (PyPI, if importable): ``sherlorch.trace()`` + ``tracker.watch(model)`` around forward and
  backward, then ``tracker.diagnose(loss)``; recorded: the first culprit op and its module tag. Run twice:
  on the default CPU scan (numba kernels, one opaque op to sherlorch's ``TorchFunctionMode``) and with
  ``PROT_LIB_SCAN=torch`` (``sherlorch_torch_scan``: the chunked scan's torch ops, which it can see).

A tool "names the birth place" when what it reports identifies the truth: the parameter (parameter cases)
or the scan quantity and its step t (scan cases). "right block" is the weaker question: does what it names
lie in the right Mamba block? Cost: wall time of the tool's whole diagnosis (median of ``--repeats``, tools
interleaved), and its ratio to one plain forward+backward of the same step.

Usage:
    python benchmarks/bench_nan_localisation.py                # all cases, 3 repeats (~5 min, one thread)
    python benchmarks/bench_nan_localisation.py --quick        # the three small cases, 1 repeat
    python benchmarks/bench_nan_localisation.py --json PATH    # default benchmarks/results/bench_nan_localisation.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from prot_lib.diagnostics import autopsy, capture_scan, capture_step, scan_autopsy  # noqa: E402
from prot_lib.models import Mamba  # noqa: E402
from prot_lib.models.mamba import inverse_softplus  # noqa: E402
from prot_lib.models.selective_scan import SCAN_ENV, selective_scan_reference  # noqa: E402

try:
    import sherlorch
    SHERLORCH = f"sherlorch {getattr(sherlorch, '__version__', '?')}"
except ImportError as err:  # said in the table and the JSON, never faked
    sherlorch = None
    SHERLORCH = f"not importable: {err}"

RESULTS = Path(__file__).resolve().parent / "results" / "bench_nan_localisation.json"


class SmallNet(nn.Module):
    """Linear(3, 8) -> Mamba(8, d_state 4) -> Linear(8, 1) on the last token."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Linear(3, 8)
        self.mamba = Mamba(8, d_state=4, backend="torch")
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.mamba(self.embedding(x))[:, -1]).squeeze(-1)


class BlockNet(nn.Module):
    """One Mamba block, mean over channels of the last token."""

    def __init__(self, block: Mamba):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)[:, -1].mean(-1)


def mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def _first_bad_t(out: torch.Tensor) -> Optional[int]:
    bad = (~torch.isfinite(out)).any(dim=(0, 1)).nonzero()
    return None if len(bad) == 0 else int(bad[0])


def case_param(name: str, index: int) -> Dict[str, Any]:
    net = SmallNet()
    with torch.no_grad():
        (net.mamba.D if name == "D" else net.mamba.dt_proj.bias)[index] = float("nan")
    batch = (torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(2))
    return {"model": net, "batch": batch, "block": "mamba", "block_module": net.mamba,
            "block_input": lambda: net.embedding(batch[0]).detach(),
            "truth": {"quantity": name, "t": None, "index": {"channel": index}}, "param_shape": (net.mamba.d_inner,)}


def case_h_overflow() -> Dict[str, Any]:
    torch.manual_seed(0)
    blk = Mamba(8, d_state=4, backend="torch")
    with torch.no_grad():
        blk.dt_proj.weight.zero_()
        blk.dt_proj.bias.fill_(float(inverse_softplus(torch.tensor(1e-3))))
        blk.x_proj.weight[blk.dt_rank + blk.d_state:] = 0.0
        blk.D.zero_()
    x = 1e21 * torch.rand(2, 1, 8, generator=torch.Generator().manual_seed(0)).expand(2, 64, 8).contiguous()
    cap = capture_scan(blk, x)
    args = [cap["u"], cap["delta"], cap["A"], cap["B"], cap["C"]]
    t = next(s for s in range(1, 65) if not bool(torch.isfinite(
        selective_scan_reference(*[a[..., :s] if a.dim() == 3 else a for a in args], return_last_state=True)[1]).all())) - 1
    return {"model": BlockNet(blk), "batch": (x, torch.zeros(2)), "block": "block", "block_module": blk,
            "block_input": lambda: x, "truth": {"quantity": "h", "t": t}}


def case_dyconex_long_ci() -> Dict[str, Any]:
    from prot_lib.training import fold_start, reproduction_config  # a benchmark may reach up the layers

    model, x, y = fold_start(reproduction_config("dyconex_long_ci"), 1)
    block = model.bimamba.forward_layers[3]
    seen: List[torch.Tensor] = []
    h = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    cap = capture_scan(block, seen[0])
    ref = selective_scan_reference(cap["u"], cap["delta"], cap["A"], cap["B"], cap["C"], D=block.D.detach(), z=cap["z"])
    return {"model": model, "batch": (x, y), "block": "bimamba.forward_layers.3", "block_module": block,
            "block_input": lambda: seen[0], "truth": {"quantity": "delta*B*u", "t": _first_bad_t(ref)}}


# ------------------------------------------------------------------------------------------- tools

def run_ours(case) -> Dict[str, Any]:
    rep = autopsy(capture_step(case["model"], case["batch"], loss_fn=mse))
    s = rep.scan
    return {"names": None if s is None else f"{s.block}: {s.quantity} {s.where()}",
            "module_hooks": rep.module, "quantity": None if s is None else s.quantity,
            "t": None if s is None else s.t, "block": None if s is None else s.block}


def run_scan_only(case) -> Dict[str, Any]:
    s = scan_autopsy(case["block_module"], case["block_input"](), case["block"])
    return {"names": f"{s.block}: {s.quantity} {s.where()}", "quantity": s.quantity, "t": s.t, "block": s.block}


def run_anomaly(case) -> Dict[str, Any]:
    model, batch = case["model"], case["batch"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the forward traceback it prints as a warning
        try:
            with torch.autograd.detect_anomaly():
                loss = mse(model, batch)
                loss.backward()
        except RuntimeError as err:
            m = re.search(r"Function '(\w+)'", str(err))
            return {"names": m.group(1) if m else str(err)[:120]}
        finally:
            model.zero_grad(set_to_none=True)
    return {"names": "nothing (no backward function returned NaN)"}


def run_sherlorch(case) -> Dict[str, Any]:
    model, batch = case["model"], case["batch"]
    with sherlorch.trace() as tracker:
        tracker.watch(model, name="model")
        loss = mse(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    try:
        d = tracker.diagnose(loss)
    except KeyError as err:
        return {"names": f"KeyError: {err}"}
    if d.ok:
        return {"names": "nothing (loss finite)"}
    c = d.culprits[0]
    return {"names": f"{c.op_name} [{c.module_path}] shape={tuple(c.shape)}", "n_culprits": len(d.culprits),
            "module": c.module_path, "shape": tuple(c.shape)}


def run_sherlorch_torch_scan(case) -> Dict[str, Any]:
    """sherlorch with the scan as torch ops (the chunked scan, ``PROT_LIB_SCAN=torch``): the numba kernels
    are one opaque op to a TorchFunctionMode, the chunked scan's ops are not."""
    old = os.environ.get(SCAN_ENV)
    os.environ[SCAN_ENV] = "torch"
    try:
        return run_sherlorch(case)
    finally:
        if old is None:
            del os.environ[SCAN_ENV]
        else:
            os.environ[SCAN_ENV] = old


def plain_step(case) -> Dict[str, Any]:
    loss = mse(case["model"], case["batch"])
    loss.backward()
    case["model"].zero_grad(set_to_none=True)
    return {}


def judge(tool: str, out: Dict[str, Any], case) -> Dict[str, Any]:
    """Does what the tool names identify the true birth place (and the right block)?"""
    truth = case["truth"]
    if tool in ("ours", "scan_only"):
        birth = out.get("quantity") == truth["quantity"] and out.get("t") == truth["t"]
        return {"names_birth": bool(birth), "right_block": out.get("block") == case["block"]}
    # An op-level tool never names a step t or a parameter (a parameter is a leaf: no op made it); the best
    # it can do for a parameter is the op that consumed it, recognisable by the parameter's shape.
    module = out.get("module") or ""
    right_block = bool(module) and (module.endswith("." + case["block"]) or f".{case['block']}." in module + ".")
    birth: Any = False
    if truth["t"] is None and right_block and out.get("shape") == case["param_shape"]:
        birth = "partly"  # the op consuming a tensor of the parameter's shape, in the right block; not which one
    return {"names_birth": birth, "right_block": right_block}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the three small cases, 1 repeat")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    repeats = 1 if args.quick else args.repeats
    builders: Dict[str, Callable[[], Dict[str, Any]]] = {
        "nan_dt_proj_bias": lambda: case_param("dt_proj.bias", 5), "nan_D": lambda: case_param("D", 7),
        "h_overflow": case_h_overflow}
    if not args.quick:
        builders["dyconex_long_ci"] = case_dyconex_long_ci
    tools: Dict[str, Callable] = {"plain_step": plain_step, "ours": run_ours, "scan_only": run_scan_only,
                                  "detect_anomaly": run_anomaly}
    if sherlorch is not None:
        tools["sherlorch"] = run_sherlorch
        tools["sherlorch_torch_scan"] = run_sherlorch_torch_scan
    rows = []
    for cname, build in builders.items():
        case = build()
        times: Dict[str, List[float]] = {t: [] for t in tools}
        outs: Dict[str, Dict[str, Any]] = {}
        names = list(tools)
        for tname in names:  # warm-up, not timed: numba's kernels load, first-call allocations
            tools[tname](case)
        for r in range(repeats):
            for tname in names[r % len(names):] + names[:r % len(names)]:  # rotate: load hits all alike
                t0 = time.perf_counter()
                outs[tname] = tools[tname](case)
                times[tname].append(time.perf_counter() - t0)
        base = statistics.median(times["plain_step"])
        for tname in tools:
            if tname == "plain_step":
                continue
            med = statistics.median(times[tname])
            rows.append({"case": cname, "tool": tname, "truth": case["truth"], **outs[tname],
                         **judge(tname, outs[tname], case), "seconds": med, "x_plain_step": med / base,
                         "plain_step_s": base, "repeats": repeats})
        if sherlorch is None:
            rows.append({"case": cname, "tool": "sherlorch", "names": SHERLORCH, "names_birth": None,
                         "right_block": None, "seconds": None, "x_plain_step": None})
    print(f"one torch thread; median of {repeats}; sherlorch: {SHERLORCH}")
    print(f"{'case':18s} {'tool':21s} {'birth':7s} {'block':6s} {'s':>8s} {'x step':>8s}  names")
    for r in rows:
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.3f}"
        ratio = "-" if r["x_plain_step"] is None else f"{r['x_plain_step']:.1f}"
        print(f"{r['case']:18s} {r['tool']:21s} {str(r['names_birth']):7s} {str(r['right_block']):6s} "
              f"{sec:>8s} {ratio:>8s}  {r['names']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                     "sherlorch": SHERLORCH, "repeats": repeats, "rows": rows}, indent=1, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
