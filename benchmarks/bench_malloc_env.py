"""The write-up's BiMamba training step (``ours``) under allocator settings, one fresh process per setting.

``bench_scan.py --malloc-tuned`` compares ``ours`` with and without
:func:`prot_lib.utils.keep_large_allocations` inside one process, switching it on and off around each
step; after the first switch, glibc's dynamic mmap threshold stays fixed. This script is the check
without that caveat: each setting runs in a process of its own, set before the process starts
(``GLIBC_TUNABLES``, ``THP_MEM_ALLOC_ENABLE``) or as its first act (``mallopt``), and the processes
of all settings take turns for ``--rounds`` rounds. Each process builds the model of
``bench_scan.WriteupBiMamba`` at the write-up's shape (batch 50, L 1023, d_model 100, 4 layers per
stack, d_state 16; one thread), runs one warm-up step and ``--steps`` timed steps (forward, MSE,
backward, AdamW), and reports per step the wall time, the minor page faults and the system time
(``getrusage``), and its peak resident size.

Settings:
  default   glibc and torch as they come
  tunables  GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824
  mallopt   keep_large_allocations() as the process's first act (the same two values, via mallopt)
  thp       THP_MEM_ALLOC_ENABLE=1: torch's own switch (c10/core/impl/alloc_cpu.cpp) to align blocks
            of 2 MiB or more to 2 MiB and madvise(MADV_HUGEPAGE) them

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_malloc_env.py --rounds 2 --json benchmarks/results/bench_malloc_env.json
    python benchmarks/bench_malloc_env.py --quick      # tiny model, checks the script runs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"
SETTINGS = {"default": {}, "tunables": {"GLIBC_TUNABLES": TUNED}, "mallopt": {}, "thp": {"THP_MEM_ALLOC_ENABLE": "1"}}


def child(setting: str, steps: int, quick: bool) -> dict:
    """One process's measurement (run in the child)."""
    import resource
    import time

    if setting == "mallopt":
        sys.path.insert(0, str(ROOT))
        from prot_lib.utils import keep_large_allocations
        assert keep_large_allocations(), "keep_large_allocations() returned False: not glibc"
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_scan import WriteupBiMamba

    torch.set_num_threads(1)
    batch, L, d_model, n_layers, d_state = (2, 16, 8, 1, 4) if quick else (50, 1023, 100, 4, 16)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, L, d_model, generator=g), torch.randn(batch, generator=g)
    torch.manual_seed(0)
    model = WriteupBiMamba(d_model, n_layers, d_state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = []
    for _ in range(steps + 1):  # the first is the warm-up
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        out.append({"s": dt, "minor_faults": r1.ru_minflt - r0.ru_minflt, "sys_s": r1.ru_stime - r0.ru_stime})
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"warmup": out[0], "steps": out[1:], "maxrss_bytes": maxrss}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="processes per setting, taking turns")
    p.add_argument("--steps", type=int, default=2, help="timed steps per process, after one warm-up")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS))
    p.add_argument("--quick", action="store_true", help="tiny model, 1 round, 1 step")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.quick)))
        return {}
    if args.quick:
        args.rounds, args.steps = 1, 1
    names = args.settings.split(",")
    unknown = set(names) - set(SETTINGS)
    if unknown:
        p.error(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    result = {"meta": {"argv": sys.argv[1:] if argv is None else list(argv), "load_average_at_start": os.getloadavg(),
                       "settings": {n: SETTINGS[n] for n in names}, "statistic": "median over processes' steps"},
              "runs": {n: [] for n in names}}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            env = {**os.environ, "OMP_NUM_THREADS": "1", **SETTINGS[name]}
            cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps)]
            cmd += ["--quick"] if args.quick else []
            done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"setting {name}: child exited {done.returncode}: {done.stderr[-1500:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            result["runs"][name].append(run)
            print(f"round {r} {name:9s} steps " + ", ".join(f"{s['s']:.2f} s ({s['minor_faults']} faults, sys "
                  f"{s['sys_s']:.2f} s)" for s in run["steps"]) + f", peak RSS {run['maxrss_bytes'] / 2**30:.2f} GiB",
                  flush=True)
    summary = {}
    for name, runs in result["runs"].items():
        steps = [s for run in runs for s in run["steps"]]
        summary[name] = {"step_s": statistics.median(s["s"] for s in steps),
                         "minor_faults": statistics.median(s["minor_faults"] for s in steps),
                         "sys_s": statistics.median(s["sys_s"] for s in steps),
                         "maxrss_bytes": max(run["maxrss_bytes"] for run in runs)}
    base = summary.get("default")
    for name, s in summary.items():
        s["default/this"] = base["step_s"] / s["step_s"] if base else None
        print(f"{name:9s} step {s['step_s']:.2f} s" + (f" ({s['default/this']:.2f}x default)" if base else "")
              + f", {s['minor_faults'] / 1e6:.2f}M faults, sys {s['sys_s']:.2f} s, "
              f"peak RSS {s['maxrss_bytes'] / 2**30:.2f} GiB")
    result["summary"] = summary
    result["meta"]["load_average_at_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
