"""What does watching for NaN cost per training step? The guards, one process, interleaved steps, two models.

Training-step time (Lightning's ``on_train_batch_start`` -> ``on_train_batch_end``: forward, loss,
backward, the hooks, ``Trainer(gradient_clip_val=1.0)``'s clipping, ``optimizer.step``), one torch
thread, batch 32 of Ishigami, AdamW/Adam, on two models:

- ``book``: the book's default run, ``config_from_dict({})``: ``NaNStudyModule`` =
  ``S6Regressor(n_features=4, d_model=16, n_layers=4)``;
- ``plain``: a user's LightningModule that knows nothing of prot_lib: a ``torch.nn.TransformerEncoder``
  regressor (d_model 32, 4 heads, 2 layers, feed-forward 64, mean pooling).

Variants (each is the module as is, plus):

- ``none``: nothing. No gradient norm is measured at all (the Trainer's clipping measures its own).
- ``empty`` (reference): a callback that does nothing, in ``trainer.callbacks``: what Lightning's dispatch of
  every hook to one more callback costs, whatever the callback does.
- ``ours``: :class:`prot_lib.callbacks.NonFiniteGuard` ``("stop")`` in ``trainer.callbacks``: Lightning
  dispatches every hook to it, it keeps the batch by reference (autopsy armed) and runs its one fused
  check (per-tensor ``_foreach_norm`` summed in float64, and the loss; one host sync). The autopsy
  itself runs only on a failing step, so never here.
- ``writeup`` (book only): the write-up's ``on_before_optimizer_step`` loop (``training.monitor_gradients``):
  ``torch.isnan(p.grad).any() or torch.isinf(p.grad).any()`` per parameter, each a Python ``bool``.
- ``anomaly``: ``torch.autograd.detect_anomaly`` (what ``Trainer(detect_anomaly=True)`` switches on).
- ``rollback`` (book only; extra row, not a check): ``NonFiniteGuard("rollback", rollback_every=1)``:
  the check plus a copy of the weights and Adam's state at every step.

Each model trains in ONE Trainer; a first callback switches the variant before every step by putting the
guard into ``trainer.callbacks`` or taking it out (so ``none`` pays no dispatch to it), in a rotating order
(round r starts with variant r mod n), so load changes on a shared machine hit all variants alike; a last
callback stops the clock. Reported: the median step time per variant, its ratio to ``none`` (goal for
``ours``: <= 1.02), and the 25th-75th percentile of the per-round ratios.

On a loaded machine (other processes on the same 2 cores) the end-to-end ratio of medians moves by several
percent from run to run, more than the guard costs. So the guard's own time is also measured directly:
every hook of the ``ours`` guard is wrapped in a timer, and its median per step is reported against the
median ``none`` step ("in-hook"; it leaves out Lightning's dispatch of the hooks to one more callback).

Usage:
    python benchmarks/bench_guards.py                    # both models, 150 steps per variant
    python benchmarks/bench_guards.py --steps 400        # tighter medians
    python benchmarks/bench_guards.py --model plain      # one model
    python benchmarks/bench_guards.py --quick            # a few steps: checks the script runs
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
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from prot_lib.callbacks import NonFiniteGuard  # noqa: E402
from prot_lib.data import load_dataset  # noqa: E402
from prot_lib.training.config import config_from_dict  # noqa: E402
from prot_lib.training.module import NaNStudyModule  # noqa: E402

VARIANTS = {"book": ("none", "empty", "writeup", "ours", "anomaly", "rollback"),
            "plain": ("none", "empty", "ours", "anomaly")}
GOAL = 1.02
LABELS = {"none": "no checks", "empty": "(reference) an empty callback", "writeup": "write-up per-parameter loop", "ours": "ours: NonFiniteGuard, autopsy armed",
          "anomaly": "torch.autograd.detect_anomaly", "rollback": "(extra) rollback copy every step"}


class TransformerRegressor(pl.LightningModule):
    """A plain user model: x (batch, L, F) -> Linear -> TransformerEncoder -> mean over L -> (batch,)."""

    def __init__(self, n_features: int, d_model: int = 32, lr: float = 1e-3):
        super().__init__()
        self.embed = nn.Linear(n_features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 1)
        self.lr = lr

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class HookTimer:
    """Wraps the Lightning hooks a callback defines (instance attributes shadow the methods, and Lightning
    looks hooks up with getattr) and sums their wall time per training step."""

    HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
             "on_train_batch_end")

    def __init__(self, cb):
        self.per_step: List[float] = []
        self._acc = 0.0
        for name in self.HOOKS:
            if name in type(cb).__dict__:
                setattr(cb, name, self._wrap(getattr(cb, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._acc += time.perf_counter() - t0
        return timed

    def close_step(self) -> None:
        self.per_step.append(self._acc)
        self._acc = 0.0


class Interleave(pl.Callback):
    """First callback: picks the variant of the coming step and starts the clock."""

    def __init__(self, variants, guards: Dict[str, NonFiniteGuard], end: "Stop", warmup_rounds: int, steps: int):
        self.variants, self.guards, self.end = variants, guards, end
        self.warmup, self.steps = warmup_rounds, steps
        self.times: Dict[str, List[float]] = {v: [] for v in variants}
        self.round_ratios: Dict[str, List[float]] = {v: [] for v in variants}
        self._i, self._current, self._round = 0, "none", {}
        self._active: Optional[NonFiniteGuard] = None

    @property
    def total_steps(self) -> int:
        return (self.warmup + self.steps) * len(self.variants)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        r, k = divmod(self._i, len(self.variants))
        v = self._current = self.variants[(r + k) % len(self.variants)]
        cbs = trainer.callbacks
        if self._active is not None:
            cbs.remove(self._active)
        self._active = self.guards.get(v)
        if self._active is not None:  # before the clock-stopping callback; Lightning visits it in this loop
            cbs.insert(cbs.index(self.end), self._active)
        if isinstance(pl_module, NaNStudyModule):
            pl_module.config.training.monitor_gradients = v == "writeup"
        torch.set_anomaly_enabled(v == "anomaly")
        self.end.t0 = time.perf_counter()

    def record(self, dt: float) -> None:
        torch.set_anomaly_enabled(False)
        timer = getattr(self._active, "_timer", None)
        if timer is not None:
            timer.close_step()
        if self._i // len(self.variants) >= self.warmup:
            self.times[self._current].append(dt)
            self._round[self._current] = dt
            if len(self._round) == len(self.variants):
                for v in self.variants:
                    self.round_ratios[v].append(self._round[v] / self._round["none"])
                self._round = {}
        self._i += 1


class Stop(pl.Callback):
    """Last callback: stops the clock after every other callback's on_train_batch_end."""

    def __init__(self):
        self.t0, self.owner = 0.0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.owner.record(time.perf_counter() - self.t0)


def run(model: str, steps: int, warmup_rounds: int) -> dict:
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cfg = config_from_dict({})
    pl.seed_everything(0, verbose=False)
    data = load_dataset(cfg.data.name, cfg.data.data_dir)
    dl = DataLoader(TensorDataset(data.x, data.y), batch_size=cfg.training.batch_size, shuffle=True,
                    generator=torch.Generator().manual_seed(0), drop_last=True)
    if model == "book":
        module = NaNStudyModule(cfg, n_features=data.x.shape[-1])
    else:
        module = TransformerRegressor(n_features=data.x.shape[-1])
    variants = VARIANTS[model]
    guards = {"ours": NonFiniteGuard("stop"), "rollback": NonFiniteGuard("rollback", rollback_every=1),
              "empty": pl.Callback()}
    guards["ours"]._timer = HookTimer(guards["ours"])
    end = Stop()
    cb = Interleave(variants, {k: g for k, g in guards.items() if k in variants}, end, warmup_rounds, steps)
    end.owner = cb
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=cb.total_steps, max_epochs=-1,
                         gradient_clip_val=1.0, logger=False, callbacks=[cb, end],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    t0 = time.perf_counter()
    trainer.fit(module, dl)
    wall = time.perf_counter() - t0
    base = statistics.median(cb.times["none"])
    rows = {}
    for v in variants:
        med = statistics.median(cb.times[v])
        rr = sorted(cb.round_ratios[v])
        q = (lambda f: rr[min(len(rr) - 1, int(f * len(rr)))]) if rr else (lambda f: float("nan"))
        rows[v] = {"median_ms": med * 1e3, "ratio": med / base, "round_ratio_p25": q(0.25),
                   "round_ratio_p75": q(0.75), "n": len(cb.times[v])}
    in_hook = guards["ours"]._timer.per_step[warmup_rounds:]
    rows["ours"]["in_hook_median_us"] = statistics.median(in_hook) * 1e6
    rows["ours"]["in_hook_ratio"] = 1.0 + statistics.median(in_hook) / base
    n_params = sum(p.numel() for p in module.parameters())
    n_tensors = sum(1 for _ in module.parameters())
    return {"model": model, "module": type(module).__name__, "parameters": n_params, "tensors": n_tensors,
            "steps_per_variant": steps, "warmup_rounds": warmup_rounds, "wall_s": wall,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "variants": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="timed steps per variant (default 150)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed rounds first (default 10)")
    ap.add_argument("--model", choices=["book", "plain", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="3 steps per variant, 1 warm-up round: checks it runs")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
    out = {"goal": {"ours_ratio_max": GOAL}, "models": {}}
    for model in (["book", "plain"] if args.model == "both" else [args.model]):
        res = out["models"][model] = run(model, steps, warmup)
        print(f"\n{model}: {res['module']} ({res['parameters']} parameters in {res['tensors']} tensors), "
              f"1 thread, gradient_clip_val 1.0, {steps} interleaved steps per variant (wall {res['wall_s']:.0f} s)")
        print(f"{'variant':38s} {'median ms':>10s} {'ratio':>7s}   per-round ratio p25-p75")
        for v, r in res["variants"].items():
            print(f"{LABELS[v]:38s} {r['median_ms']:10.2f} {r['ratio']:7.3f}   "
                  f"{r['round_ratio_p25']:.3f}-{r['round_ratio_p75']:.3f}")
        o = res["variants"]["ours"]
        ours = o["ratio"]
        res["goal_met"] = ours <= GOAL
        print(f"guard's own hooks: median {o['in_hook_median_us']:.0f} us per step = "
              f"{o['in_hook_ratio']:.4f} x the median unguarded step")
        print(f"goal: ours <= {GOAL} x no checks: {'met' if ours <= GOAL else 'NOT met'} ({ours:.3f})"
              + (" [--quick: too few steps to judge]" if args.quick else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
