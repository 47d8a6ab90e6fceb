"""Benchmark the Mamba block's non-scan ops that issue 13's block rewrite replaced, one against the
other, at the write-up's shape (batch 50, L 1023, d_inner 200, dt_rank 7, d_conv 4), on CPU.

Pairs (each: the old form, then the new one; forward and backward of ``sum(out * g)``):

- ``conv``: torch's ``nn.Conv1d`` (depthwise, padding K-1, cut back to L) on the channels-first
  (batch, d_inner, L) layout, with the transposed copies the old block made around it (from and to
  the time-major layout of in_proj and x_proj), against ``causal_depthwise_conv1d`` on the
  time-major layout (numba kernels, and its torch-ops path with ``PROT_LIB_SCAN=torch``).
- ``dt_proj``: ``F.linear(delta, dt_proj.weight)`` (rank 7 -> 200) against ``_LowRankLinearFn``.
- ``transpose``: ``t.transpose(1, 2).contiguous()`` of a contiguous (batch, d_inner, L) tensor against
  the compiled tiled transpose of ``numba_scan._swapped`` (forward only).

Each number is the median of ``--repeats`` calls, the pair's calls interleaved so that load hits
both alike; the ratio is old / new (> 1: the new form is faster). No test asserts a time.

``--profile-block`` instead prints ``torch.profiler``'s table for one whole ``Mamba`` block, forward
and backward of ``sum(out * g)`` at the write-up shape (after one warm-up call), and the time of
filling a fresh (batch * L, 4 * d_model) float32 tensor (in_proj's output) against filling an
existing one: what glibc's fresh mapping of large blocks (page faults) costs each such output.

Usage:
    python benchmarks/bench_block_ops.py              # write-up shape, 1 thread, 7 repeats
    python benchmarks/bench_block_ops.py --quick      # tiny shape, 1 repeat: checks the script runs
    python benchmarks/bench_block_ops.py --profile-block
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from prot_lib.models.mamba import CausalConv1d, Mamba, _LowRankLinearFn, causal_depthwise_conv1d  # noqa: E402
from prot_lib.models.numba_scan import _swapped  # noqa: E402


def _fwd_bwd(fn: Callable, leaves: List[torch.Tensor], g: torch.Tensor) -> Callable[[], None]:
    def call():
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, g)
    return call


def pairs(batch: int, L: int, d_inner: int, rank: int, d_conv: int) -> Dict[str, Dict[str, Callable[[], None]]]:
    gen = torch.Generator().manual_seed(0)
    conv = CausalConv1d(d_inner, d_conv)
    # x as the block reads it: one half of in_proj's (batch, L, 2 * d_inner) output
    x = torch.randn(batch, L, 2 * d_inner, generator=gen)[..., :d_inner].requires_grad_(True)
    g = torch.randn(batch, L, d_inner, generator=gen)

    def conv_old(x, w, b):  # the old block: transpose, nn.Conv1d, cut, transposed copy for x_proj
        return F.conv1d(x.transpose(1, 2), w, b, padding=d_conv - 1, groups=d_inner)[..., :L].transpose(1, 2).contiguous()

    def conv_torch_ops(x, w, b):
        before = os.environ.get("PROT_LIB_SCAN")
        os.environ["PROT_LIB_SCAN"] = "torch"
        try:
            return causal_depthwise_conv1d(x, w, b)
        finally:
            if before is None:
                del os.environ["PROT_LIB_SCAN"]
            else:
                os.environ["PROT_LIB_SCAN"] = before

    leaves = [x, conv.weight, conv.bias]
    delta = torch.randn(batch, L, rank, generator=gen).requires_grad_(True)
    weight = torch.randn(d_inner, rank, generator=gen).requires_grad_(True)
    channels_first = torch.randn(batch, d_inner, L, generator=gen)
    return {
        "conv fwd+bwd": {"nn.Conv1d + transposes": _fwd_bwd(conv_old, leaves, g),
                         "time-major (numba)": _fwd_bwd(causal_depthwise_conv1d, leaves, g),
                         "time-major (torch ops)": _fwd_bwd(conv_torch_ops, leaves, g)},
        "dt_proj fwd+bwd": {"F.linear": _fwd_bwd(F.linear, [delta, weight], g),
                            "_LowRankLinearFn": _fwd_bwd(_LowRankLinearFn.apply, [delta, weight], g)},
        "transpose fwd": {"transpose.contiguous": lambda: channels_first.transpose(1, 2).contiguous(),
                          "_swapped (numba)": lambda: _swapped(channels_first)},
    }


def profile_block(batch: int, L: int, d_model: int, repeats: int) -> None:
    """torch.profiler's table for one Mamba block's forward + backward, and fresh-vs-reused fills."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    block = Mamba(d_model, backend="torch")
    x = torch.randn(batch, L, d_model, requires_grad=True)
    g = torch.randn(batch, L, d_model)
    block(x).backward(g)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        block(x).backward(g)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25))
    shape = (batch * L, 4 * d_model)
    reused = torch.empty(shape)
    fills = {"fresh": lambda: torch.empty(shape).fill_(1.0), "reused": lambda: reused.fill_(1.0)}
    times: Dict[str, List[float]] = {k: [] for k in fills}
    for _ in range(repeats):
        for k, call in fills.items():
            t0 = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - t0)
    print(f"fill {shape} float32: fresh {statistics.median(times['fresh']) * 1e3:.1f} ms, "
          f"reused {statistics.median(times['reused']) * 1e3:.1f} ms (median of {repeats})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 repeat (checks the script runs)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per op (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--profile-block", action="store_true", help="profile one Mamba block instead (see above)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (2, 20, 16, 2, 4) if args.quick else (50, 1023, 200, 7, 4)
    repeats = args.repeats or (1 if args.quick else 7)
    if args.profile_block:
        profile_block(shape[0], shape[1], shape[2] // 2, repeats)
        return
    print(f"batch, L, d_inner, dt_rank, d_conv = {shape}; {args.threads} thread(s); median of {repeats}; "
          f"load average {os.getloadavg()}", flush=True)
    for name, ops in pairs(*shape).items():
        times: Dict[str, List[float]] = {k: [] for k in ops}
        for call in ops.values():
            call()  # warm-up (and the JIT's first call)
        for r in range(repeats):
            order = list(ops)
            for k in order[r % len(order):] + order[:r % len(order)]:
                t0 = time.perf_counter()
                ops[k]()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        old = next(iter(med))
        print(f"{name:16s} " + " | ".join(f"{k} {t * 1e3:7.1f} ms" + ("" if k == old else f" ({med[old] / t:.2f}x)")
                                          for k, t in med.items()), flush=True)


if __name__ == "__main__":
    main()
