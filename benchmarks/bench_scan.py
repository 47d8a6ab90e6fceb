"""Benchmark the S6 selective scans on CPU: time, peak memory and errors, in one process, interleaved.

Scans compared (same contract as mamba-ssm's ``selective_scan_ref``; same delta bias + softplus,
D skip and silu(z) gate around each recurrence):

- ``ref``: :func:`prot_lib.models.selective_scan.selective_scan_reference`, mamba-ssm's
  ``selective_scan_ref`` algorithm as published, with its per-step indexing ``deltaA[:, :, i]``
  (whose backward builds a full-size zero gradient per step: O(L^2)).
- ``unbind``: :func:`prot_lib.models.selective_scan.selective_scan_unbind`, the same loop with
  ``.unbind`` (bit-identical results, O(L) backward).
- ``pscan``: mambapy's Blelloch ``pscan`` (PyPI ``mambapy``, the optional ``bench`` dependency),
  wrapped as ``mambapy.mamba.MambaBlock.selective_scan`` does; skipped, with a note, if not installed.
- ``ours``: :func:`prot_lib.models.chunked_scan.selective_scan_chunked`, the default path.

Grid: batch 16, d_inner in {64, 256}, d_state 16, L in {32, 128, 512, 2048}; "fwd" (under
torch.no_grad, i.e. inference) and "fwd+bwd" (forward, then backward of sum(out * g)); median of
``--repeats`` calls per scan, the scans' calls interleaved (rotating order) so load changes hit all
of them; every thread count of ``--threads`` in turn (torch.set_num_threads).

Skips: a call's time is estimated from the same scan at the previous L (x (L/L_prev)^2 for the
reference's O(L^2) backward, x L/L_prev otherwise). The reference is skipped where the estimate
exceeds ``--max-ref-call-s`` (printed as ``skipped (est. N s)``; e.g. L=2048 fwd+bwd, ~450 s), and
any scan runs fewer repeats where ``repeats * estimate`` exceeds ``--cell-budget-s``.

Peak memory: bytes allocated above those live at the call's start, from one extra call under
torch.profiler(profile_memory=True). Errors: max |ours - reference| over out, last state and every
gradient, absolute and relative to max |reference| (reference = ``ref``, or ``unbind`` where ``ref``
is skipped; the two are bit-identical, checked where both ran).

Also times one training step (forward, MSE, backward, Adam) of the book's default model,
``S6Regressor(n_features=4, d_model=16, n_layers=4)``, batch 32, with each scan patched in as
``prot_lib.models.selective_scan._fast_scan``.

Usage:
    python benchmarks/bench_scan.py                 # full grid, threads 1 and 2 (several minutes)
    python benchmarks/bench_scan.py --quick         # tiny sizes, 1 repeat: checks the script runs
    python benchmarks/bench_scan.py --json out.json --threads 1
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from prot_lib.models.chunked_scan import default_chunk_size, selective_scan_chunked  # noqa: E402
from prot_lib.models.selective_scan import (_check_shapes, _finish, _prepare,  # noqa: E402
                                            selective_scan_reference, selective_scan_unbind)

try:
    from mambapy.pscan import pscan as _mambapy_pscan
    MAMBAPY_VERSION: Optional[str] = importlib.metadata.version("mambapy")
except ImportError:  # optional bench dependency
    _mambapy_pscan = None
    MAMBAPY_VERSION = None

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "bench_scan.json"
MODES = ("fwd", "fwd+bwd")


def selective_scan_mambapy(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """The reference contract with mambapy's parallel ``pscan`` for the recurrence.

    As ``mambapy.mamba.MambaBlock.selective_scan``: builds exp(delta A) and delta B u as full
    (batch, L, d_inner, d_state) tensors, scans them with ``pscan`` (L padded to a power of two
    inside), then y = h . C. Needs B and C of shape (batch, d_state, L).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    dl = delta.transpose(1, 2)  # (batch, L, d_inner)
    deltaA = torch.exp(dl.unsqueeze(-1) * A)  # (batch, L, d_inner, d_state)
    BX = (dl.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)) * u.transpose(1, 2).unsqueeze(-1)
    hs = _mambapy_pscan(deltaA, BX)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3)  # (batch, L, d_inner)
    out = _finish(y.transpose(1, 2), u, D, z, dtype_in)
    return (out, hs[:, -1]) if return_last_state else out


SCANS: Dict[str, Optional[Callable]] = {
    "ref": selective_scan_reference,
    "unbind": selective_scan_unbind,
    "pscan": selective_scan_mambapy if _mambapy_pscan is not None else None,
    "ours": selective_scan_chunked,
}
DESCRIPTION = {
    "ref": "mamba-ssm selective_scan_ref algorithm as published (per-step deltaA[:, :, i] indexing): "
           "prot_lib.models.selective_scan.selective_scan_reference",
    "unbind": "the same loop with .unbind: prot_lib.models.selective_scan.selective_scan_unbind",
    "pscan": f"mambapy {MAMBAPY_VERSION} pscan (Blelloch parallel scan)" if MAMBAPY_VERSION
             else "mambapy not installed: column skipped (pip install mambapy)",
    "ours": "prot_lib.models.chunked_scan.selective_scan_chunked (default path of selective_scan)",
}
ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch: int, d_inner: int, d_state: int, L: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Inputs as a freshly initialised mamba-ssm block feeds the scan: A = -(1..d_state) per channel,
    delta_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 0.1], D = 1; u, delta, B, C, z ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(d_inner, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": torch.randn(batch, d_inner, L, generator=g),
        "delta": torch.randn(batch, d_inner, L, generator=g),
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1),
        "B": torch.randn(batch, d_state, L, generator=g),
        "C": torch.randn(batch, d_state, L, generator=g),
        "D": torch.ones(d_inner),
        "z": torch.randn(batch, d_inner, L, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }


def _leaves(inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}


def run_once(fn: Callable, inputs: Dict[str, torch.Tensor], mode: str, grad_out: torch.Tensor) -> float:
    """One call; returns its wall time in seconds (input preparation excluded)."""
    if mode == "fwd":
        with torch.no_grad():
            t0 = time.perf_counter()
            fn(**inputs, delta_softplus=True)
            return time.perf_counter() - t0
    leaves = _leaves(inputs)
    t0 = time.perf_counter()
    out = fn(**leaves, delta_softplus=True)
    out.backward(grad_out)
    return time.perf_counter() - t0


def measured(call: Callable[[], object], memory: bool) -> Tuple[object, Optional[int]]:
    """``call()``'s result and, with ``memory``, the peak of bytes it allocated above those live
    when it started (from torch.profiler's memory events)."""
    if not memory:
        return call(), None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return result, int(peak)


def full_results(fn: Callable, inputs: Dict[str, torch.Tensor],
                 grad_out: torch.Tensor) -> Dict[str, torch.Tensor]:
    """out, last state and the gradient of sum(out * grad_out) w.r.t. every input."""
    leaves = _leaves(inputs)
    out, last = fn(**leaves, delta_softplus=True, return_last_state=True)
    grads = torch.autograd.grad((out * grad_out).sum(), list(leaves.values()))
    res = {"out": out.detach(), "last_state": last.detach()}
    res.update({f"grad_{k}": g for k, g in zip(leaves, grads)})
    return res


def max_errors(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """max |a - e| over all tensors, and the largest per-tensor max |a - e| / max |e|."""
    abs_err = rel_err = 0.0
    for k, e in expected.items():
        err = (actual[k].float() - e.float()).abs().max().item()
        abs_err = max(abs_err, err)
        scale = e.abs().max().item()
        rel_err = max(rel_err, err / scale if scale > 0 else err)
    return {"max_abs": abs_err, "max_rel": rel_err}


def estimate(history: Dict, key, L: int, quadratic: bool) -> Optional[float]:
    prev = history.get(key)
    if prev is None:
        return None
    L_prev, t_prev = prev
    return t_prev * (L / L_prev) ** (2 if quadratic else 1)


def bench_grid(args, threads: int, log, cells: List[Dict], save: Callable[[], None]) -> None:
    """Time every cell of the grid with ``threads`` threads; appends to ``cells``, saving after each."""
    torch.set_num_threads(threads)
    names = [n for n, f in SCANS.items() if f is not None]
    memory = not args.no_memory
    history: Dict = {}  # (scan, d_inner, mode) -> (L, median seconds)
    for d_inner in args.d_inner:
        for L in args.L:
            inputs = make_inputs(args.batch, d_inner, args.d_state, L)
            grad_out = torch.randn(args.batch, d_inner, L, generator=torch.Generator().manual_seed(1))
            for mode in MODES:
                cell = {"threads": threads, "batch": args.batch, "d_inner": d_inner,
                        "d_state": args.d_state, "L": L, "mode": mode,
                        "chunk_size": min(L, default_chunk_size(args.batch, d_inner, args.d_state)),
                        "time_s": {}, "repeats": {}, "skipped_est_s": {}, "peak_mem_bytes": {}}
                plan = {}
                for name in names:
                    est = estimate(history, (name, d_inner, mode), L,
                                   quadratic=(name == "ref" and mode == "fwd+bwd"))
                    if name == "ref" and est is not None and est > args.max_ref_call_s:
                        cell["skipped_est_s"][name] = est
                        continue
                    reps = args.repeats
                    if est is not None and est * reps > args.cell_budget_s:
                        reps = max(1, int(args.cell_budget_s // est))
                    plan[name] = {"reps": reps, "times": [], "warm": est is None or est < 1.0}
                for name, p in plan.items():  # warm-up (allocator, lazy init) where it is cheap
                    if p["warm"]:
                        run_once(SCANS[name], inputs, mode, grad_out)
                for r in range(max(p["reps"] for p in plan.values())):
                    order = list(plan)[r % len(plan):] + list(plan)[: r % len(plan)]
                    for name in order:
                        if len(plan[name]["times"]) < plan[name]["reps"]:
                            plan[name]["times"].append(run_once(SCANS[name], inputs, mode, grad_out))
                for name, p in plan.items():
                    med = statistics.median(p["times"])
                    cell["time_s"][name] = med
                    cell["repeats"][name] = len(p["times"])
                    history[(name, d_inner, mode)] = (L, med)
                ours = cell["time_s"]["ours"]
                cell["ratios"] = {f"ours_vs_{n}": t / ours for n, t in cell["time_s"].items() if n != "ours"}
                # one more call per scan, under the profiler: peak memory, and (fwd+bwd) the errors
                if mode == "fwd" and memory:
                    for name in plan:
                        _, cell["peak_mem_bytes"][name] = measured(
                            lambda: run_once(SCANS[name], inputs, mode, grad_out), memory)
                elif mode == "fwd+bwd":
                    results = {}
                    for name in plan:
                        results[name], cell["peak_mem_bytes"][name] = measured(
                            lambda: full_results(SCANS[name], inputs, grad_out), memory)
                    base = "ref" if "ref" in results else "unbind"  # unbind is bit-identical to ref
                    cell["errors"] = {"against": base}
                    cell["errors"].update({n: max_errors(r, results[base])
                                           for n, r in results.items() if n != base})
                cells.append(cell)
                save()
                log(format_row(cell))


def format_row(cell: Dict) -> str:
    parts = [f"d={cell['d_inner']:<4d} L={cell['L']:<5d} {cell['mode']:<8s}"]
    for name in SCANS:
        if name in cell["time_s"]:
            mem = cell["peak_mem_bytes"].get(name)
            mem_s = f" {mem / 2**20:8.2f}MiB" if mem is not None else ""
            parts.append(f"{name}={cell['time_s'][name] * 1e3:9.2f}ms{mem_s}")
        elif name in cell["skipped_est_s"]:
            parts.append(f"{name}=skipped (est. {cell['skipped_est_s'][name]:.0f} s)")
        elif SCANS[name] is None:
            parts.append(f"{name}=n/a (mambapy missing)")
    parts.append(" ".join(f"{k}={v:.1f}x" for k, v in cell["ratios"].items()))
    if "errors" in cell:
        errs = {k: v["max_rel"] for k, v in cell["errors"].items() if k != "against"}
        parts.append("maxrel err vs " + cell["errors"]["against"] + ": "
                     + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    return " | ".join(parts)


def print_table(cells: List[Dict], log) -> None:
    names = list(SCANS)
    head = (f"{'thr':>3} {'d_inner':>7} {'L':>5} {'mode':<8}" + "".join(f"{n + ' ms':>12}" for n in names)
            + "".join(f"{n + '/ours':>13}" for n in names if n != "ours")
            + "".join(f"{n + ' MiB':>11}" for n in names))
    log(head)
    log("-" * len(head))
    for c in cells:
        row = f"{c['threads']:>3} {c['d_inner']:>7} {c['L']:>5} {c['mode']:<8}"
        for n in names:
            if n in c["time_s"]:
                row += f"{c['time_s'][n] * 1e3:12.2f}"
            elif n in c["skipped_est_s"]:
                row += f"{'skip~' + format(c['skipped_est_s'][n], '.0f') + 's':>12}"
            else:
                row += f"{'n/a':>12}"
        for n in names:
            if n != "ours":
                r = c["ratios"].get(f"ours_vs_{n}")
                row += f"{r:12.1f}x" if r is not None else f"{'-':>13}"
        for n in names:
            m = c["peak_mem_bytes"].get(n)
            row += f"{m / 2**20:11.2f}" if m is not None else f"{'-':>11}"
        log(row)


def check_targets(cells: List[Dict]) -> List[Dict]:
    """The issue's targets, where this run measured them (reported, never asserted)."""
    out = []

    def find(threads, d_inner, L, mode):
        return next((c for c in cells if (c["threads"], c["d_inner"], c["L"], c["mode"])
                     == (threads, d_inner, L, mode)), None)

    for threads in sorted({c["threads"] for c in cells}):
        for mode, other, need in (("fwd+bwd", "ref", 40), ("fwd+bwd", "unbind", 3), ("fwd+bwd", "pscan", 4),
                                  ("fwd", "ref", 3)):
            c = find(threads, 64, 512, mode)
            r = c["ratios"].get(f"ours_vs_{other}") if c else None
            if r is not None:
                out.append({"threads": threads, "target": f"d_inner=64 L=512 {mode}: ours >= {need}x {other}",
                            "ratio": r, "met": r >= need})
        for c in cells:
            if c["threads"] == threads and (c["L"] == 2048 or c["d_inner"] == 256) and c["ratios"]:
                slowest_rival = min(c["ratios"].values())
                out.append({"threads": threads, "target": f"d_inner={c['d_inner']} L={c['L']} {c['mode']}: "
                            f"ours fastest", "ratio": slowest_rival, "met": slowest_rival > 1})
    return out


def bench_model_step(args, threads: int, log, rows: List[Dict], save: Callable[[], None]) -> None:
    """Training-step time of S6Regressor(n_features=4, d_model=16, n_layers=4) with each scan;
    appends to ``rows``, saving after each."""
    from prot_lib.models import S6Regressor

    ss_module = importlib.import_module("prot_lib.models.selective_scan")
    torch.set_num_threads(threads)
    original = ss_module._fast_scan
    names = [n for n, f in SCANS.items() if f is not None]
    try:
        for L in args.model_L:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(args.model_batch, L, 4, generator=g)
            y = torch.randn(args.model_batch, generator=g)
            setups = {}
            for name in names:
                torch.manual_seed(0)
                model = S6Regressor(n_features=4, d_model=16, n_layers=4, backend="torch")
                setups[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))

            def step(name):
                ss_module._fast_scan = SCANS[name]
                model, opt = setups[name]
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                return time.perf_counter() - t0, loss.item()

            row = {"threads": threads, "batch": args.model_batch, "L": L, "time_s": {}, "skipped_est_s": {},
                   "first_loss": {}}
            active = []
            for name in names:  # first step: warm-up, and the estimate for the skip rule
                t, loss = step(name)
                row["first_loss"][name] = loss
                if name == "ref" and t * args.model_repeats > args.cell_budget_s:
                    row["skipped_est_s"][name] = t * args.model_repeats
                else:
                    active.append(name)
            times = {n: [] for n in active}
            for r in range(args.model_repeats):
                for name in active[r % len(active):] + active[: r % len(active)]:
                    times[name].append(step(name)[0])
            row["time_s"] = {n: statistics.median(t) for n, t in times.items()}
            ours = row["time_s"]["ours"]
            row["ratios"] = {f"ours_vs_{n}": t / ours for n, t in row["time_s"].items() if n != "ours"}
            rows.append(row)
            save()
            log(f"model step threads={threads} batch={args.model_batch} L={L:<4d} | "
                + " | ".join(f"{n}={t * 1e3:.2f}ms" for n, t in row["time_s"].items())
                + "".join(f" | {n}=skipped (est. {e:.0f} s for {args.model_repeats} steps)"
                          for n, e in row["skipped_est_s"].items())
                + " | " + " ".join(f"{k}={v:.2f}x" for k, v in row["ratios"].items()))
    finally:
        ss_module._fast_scan = original


def _ints(text: str) -> List[int]:
    return [int(t) for t in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (CI: checks the script runs)")
    p.add_argument("--threads", type=_ints, default=None,
                   help="comma-separated torch thread counts (default 1,2; quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per scan and cell (default 5)")
    p.add_argument("--json", type=Path, default=None,
                   help=f"output JSON (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--max-ref-call-s", type=float, default=60.0,
                   help="skip the reference where one call is estimated to take longer (s)")
    p.add_argument("--cell-budget-s", type=float, default=120.0,
                   help="fewer repeats where repeats x estimated call time exceeds this (s)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    p.add_argument("--d-inner", type=_ints, default=None, help="override the d_inner list, e.g. 64")
    p.add_argument("--L", type=_ints, default=None, help="override the L list, e.g. 32,128,512")
    p.add_argument("--model-L", type=_ints, default=None, help="override the model-step L list")
    args = p.parse_args(argv)
    grid = {"d_inner": args.d_inner, "L": args.L, "model_L": args.model_L}
    if args.quick:
        args.batch, args.d_inner, args.d_state, args.L = 2, [8], 4, [8, 20]
        args.model_L, args.model_batch, args.model_repeats = [3], 4, 1
        args.threads = args.threads or [1]
        args.repeats = args.repeats or 1
    else:
        args.batch, args.d_inner, args.d_state, args.L = 16, [64, 256], 16, [32, 128, 512, 2048]
        args.model_L, args.model_batch, args.model_repeats = [3, 18, 128], 32, 7
        args.threads = args.threads or [1, 2]
        args.repeats = args.repeats or 5
    for key, value in grid.items():
        if value:
            setattr(args, key, value)
    args.json = args.json or DEFAULT_JSON
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if SCANS["pscan"] is None:
        log("mambapy is not installed: the pscan column is skipped (pip install mambapy, the 'bench' extra)")
    for name, text in DESCRIPTION.items():
        log(f"  {name:7s} {text}")
    result = {
        "meta": {"torch": torch.__version__, "mambapy": MAMBAPY_VERSION, "python": platform.python_version(),
                 "machine": platform.machine(), "processor": platform.processor(),
                 "cpu_count": os.cpu_count(), "argv": sys.argv[1:] if argv is None else list(argv),
                 "quick": args.quick, "repeats": args.repeats, "statistic": "median",
                 "max_ref_call_s": args.max_ref_call_s, "cell_budget_s": args.cell_budget_s,
                 "fwd_mode": "under torch.no_grad", "fwd+bwd_mode": "forward then backward of sum(out * g)",
                 "peak_mem": "bytes allocated above those live at the call's start (torch.profiler)",
                 "scans": DESCRIPTION, "complete": False},
        "cells": [], "targets": [], "model_step": [],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every cell, so that an interrupted run keeps what it measured
        result["targets"] = check_targets(result["cells"])
        args.json.write_text(json.dumps(result, indent=1))

    threads_before = torch.get_num_threads()
    try:
        for threads in args.threads:
            log(f"--- torch.set_num_threads({threads})")
            bench_grid(args, threads, log, result["cells"], save)
            bench_model_step(args, threads, log, result["model_step"], save)
    finally:
        torch.set_num_threads(threads_before)
    result["meta"]["complete"] = True
    save()
    log("")
    print_table(result["cells"], log)
    if result["targets"]:
        log("")
        log("targets of the issue (ratio = time of the other scan / ours; 'fastest': the closest rival):")
        for t in result["targets"]:
            verdict = "met" if t["met"] else "NOT MET"
            log(f"  threads={t['threads']} {t['target']:<48s} {t['ratio']:8.1f}x  {verdict}")
    log(f"wrote {args.json}")
    return result

if __name__ == "__main__":
    main()
