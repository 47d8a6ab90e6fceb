"""What does watching for NaN cost per training step? Four guards, one process, interleaved steps.

Training-step time (Lightning's ``on_train_batch_start`` -> ``on_train_batch_end``: forward, loss,
backward, the hooks, clipping, ``optimizer.step``) of the book's default run, ``config_from_dict({})``:
``S6Regressor(n_features=4, d_model=16, n_layers=4)`` on Ishigami, batch 32, AdamW, clipping at 1.0,
one torch thread, with:

- ``none``: no check. The module as the book runs it (``training.on_nonfinite: continue``); it
  measures the total gradient norm before and after clipping for its history, as every variant does.
- ``writeup``: the write-up's ``on_before_optimizer_step`` loop (``training.monitor_gradients``):
  ``torch.isnan(p.grad).any() or torch.isinf(p.grad).any()`` per parameter, each a Python ``bool``.
- ``ours``: ``training.on_nonfinite: stop``: the fused check (``math.isfinite`` of the loss and of the
  total gradient norm that clipping and logging compute anyway) with the autopsy armed (the step's
  batch kept by reference). The autopsy itself runs only on a failing step, so never here.
- ``anomaly``: ``torch.autograd.detect_anomaly`` (what ``Trainer(detect_anomaly=True)`` switches on):
  every forward op records its traceback, every backward op checks its output for NaN.
- ``rollback`` (extra row, not a check): ``on_nonfinite: rollback`` with ``rollback_every: 1``, i.e.
  the check plus a copy of the weights and Adam's state at every step.

All variants train ONE model in ONE Trainer; a callback switches the variant before every step, in
a rotating order (round r starts with variant r mod n), so load changes on a shared machine hit all
variants alike. Reported: the median step time per variant and its ratio to ``none`` (goal for
``ours``: <= 1.02), plus the 25th-75th percentile of the per-round ratios.

Usage:
    python benchmarks/bench_guards.py                  # 150 steps per variant after 10 warm-up rounds
    python benchmarks/bench_guards.py --steps 400      # tighter medians
    python benchmarks/bench_guards.py --quick          # a few steps: checks the script runs
    python benchmarks/bench_guards.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from prot_lib.data import load_dataset  # noqa: E402
from prot_lib.diagnostics.policies import NonFiniteGuard  # noqa: E402
from prot_lib.training.config import config_from_dict  # noqa: E402
from prot_lib.training.module import NaNStudyModule  # noqa: E402

VARIANTS = ("none", "writeup", "ours", "anomaly", "rollback")
GOAL = 1.02


class Interleave(pl.Callback):
    """Switch the guard variant before each training step and time the step (perf_counter, seconds)."""

    def __init__(self, module: NaNStudyModule, warmup_rounds: int, steps: int):
        t = module.config.training
        self.guards = {"ours": NonFiniteGuard(t.model_copy(update={"on_nonfinite": "stop"})),
                       "rollback": NonFiniteGuard(t.model_copy(update={"on_nonfinite": "rollback",
                                                                         "rollback_every": 1}))}
        self.warmup, self.steps = warmup_rounds, steps
        self.times: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        self.round_ratios: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        self._i = 0
        self._t0 = 0.0
        self._current = "none"
        self._round: Dict[str, float] = {}

    @property
    def total_steps(self) -> int:
        return (self.warmup + self.steps) * len(VARIANTS)

    def _variant(self, i: int) -> str:
        r, k = divmod(i, len(VARIANTS))
        return VARIANTS[(r + k) % len(VARIANTS)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        v = self._current = self._variant(self._i)
        pl_module.guard = self.guards.get(v)
        pl_module.config.training.monitor_gradients = v == "writeup"
        torch.set_anomaly_enabled(v == "anomaly")
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dt = time.perf_counter() - self._t0
        torch.set_anomaly_enabled(False)
        r = self._i // len(VARIANTS)
        if r >= self.warmup:
            self.times[self._current].append(dt)
            self._round[self._current] = dt
            if len(self._round) == len(VARIANTS):
                for v in VARIANTS:
                    self.round_ratios[v].append(self._round[v] / self._round["none"])
                self._round = {}
        self._i += 1


def run(steps: int, warmup_rounds: int) -> dict:
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cfg = config_from_dict({})
    pl.seed_everything(0, verbose=False)
    data = load_dataset(cfg.data.name, cfg.data.data_dir)
    dl = DataLoader(TensorDataset(data.x, data.y), batch_size=cfg.training.batch_size, shuffle=True,
                    generator=torch.Generator().manual_seed(0), drop_last=True)
    module = NaNStudyModule(cfg, n_features=data.x.shape[-1])
    cb = Interleave(module, warmup_rounds, steps)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=cb.total_steps, max_epochs=-1,
                         gradient_clip_val=cfg.training.gradient_clip_val, logger=False, callbacks=[cb],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    t0 = time.perf_counter()
    trainer.fit(module, dl)
    wall = time.perf_counter() - t0
    base = statistics.median(cb.times["none"])
    rows = {}
    for v in VARIANTS:
        med = statistics.median(cb.times[v])
        rr = sorted(cb.round_ratios[v])
        q = (lambda f: rr[min(len(rr) - 1, int(f * len(rr)))]) if rr else (lambda f: float("nan"))
        rows[v] = {"median_ms": med * 1e3, "ratio": med / base, "round_ratio_p25": q(0.25),
                   "round_ratio_p75": q(0.75), "n": len(cb.times[v])}
    return {"steps_per_variant": steps, "warmup_rounds": warmup_rounds, "wall_s": wall,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "variants": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="timed steps per variant (default 150)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed rounds first (default 10)")
    ap.add_argument("--quick", action="store_true", help="3 steps per variant, 1 warm-up round: checks it runs")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
    res = run(steps, warmup)
    labels = {"none": "no checks", "writeup": "write-up per-parameter loop", "ours": "ours: fused check, autopsy armed",
              "anomaly": "torch.autograd.detect_anomaly", "rollback": "(extra) rollback copy every step"}
    print(f"training-step time, book default model, 1 thread, {steps} interleaved steps per variant "
          f"(wall {res['wall_s']:.0f} s)")
    print(f"{'variant':36s} {'median ms':>10s} {'ratio':>7s}   per-round ratio p25-p75")
    for v, r in res["variants"].items():
        print(f"{labels[v]:36s} {r['median_ms']:10.2f} {r['ratio']:7.3f}   "
              f"{r['round_ratio_p25']:.3f}-{r['round_ratio_p75']:.3f}")
    ours = res["variants"]["ours"]["ratio"]
    met = ours <= GOAL
    res["goal"] = {"ours_ratio_max": GOAL, "met": met}
    print(f"goal: ours <= {GOAL} x no checks: {'met' if met else 'NOT met'} ({ours:.3f})"
          + (" [--quick: too few steps to judge]" if args.quick else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
