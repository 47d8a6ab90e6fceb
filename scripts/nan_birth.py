#!/usr/bin/env python
"""Where is the first non-finite number of a diverging fold born? Forward hooks + gradient hooks.

Trains one fold of a shipped reproduction (same seeds, same batches as ``run_kfold``) with a
callback that, at every training step, records

* the largest |prediction| and the raw loss;
* in the forward pass: the first module (execution order) whose output holds inf/NaN, and whether
  its input was still finite (= the module where the non-finite value was born);
* the norm of the parameter update ||theta_after - theta_before|| of the step (float64);
* in the backward pass: the order in which parameters receive a non-finite gradient (tensor
  hooks fire in backward order, so the first one is nearest the loss).

It prints the steps around the first non-finite one.

    .venv/bin/python scripts/nan_birth.py --dataset ishigami --seed 0 --fold 2 --out x.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl
import torch
import yaml

from prot_lib.training import run_kfold
from prot_lib.training.config import reproduction_config


def _fin(t):
    return bool(torch.isfinite(t).all()) if torch.is_tensor(t) and t.is_floating_point() else True


class NaNBirth(pl.Callback):
    def __init__(self):
        self.rows = []
        self._cur = None
        self._handles = []

    def setup(self, trainer, pl_module, stage=None):
        model = pl_module.model
        for name, mod in model.named_modules():
            if not name or isinstance(mod, torch.nn.Identity):
                continue

            def fhook(mod, inp, out, _name=name):
                cur = self._cur
                if cur is None or cur.get("fwd_first") is not None or not torch.is_grad_enabled():
                    return
                if not _fin(out):
                    cur["fwd_first"] = _name
                    cur["fwd_first_input_finite"] = _fin(inp[0]) if inp else None
                    cur["fwd_first_input_absmax"] = float(inp[0].abs().max()) if inp and _fin(inp[0]) else None
            self._handles.append(mod.register_forward_hook(fhook))
        for name, p in pl_module.named_parameters():
            def ghook(g, _name=name):
                cur = self._cur
                if cur is not None and not _fin(g):
                    cur["bwd_nonfinite_order"].append(_name)
                return g
            self._handles.append(p.register_hook(ghook))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._cur = {"step": trainer.global_step, "fwd_first": None, "bwd_nonfinite_order": []}
        with torch.no_grad():
            x, y = batch
            pred = pl_module.model(x)
        self._cur["pred_absmax"] = float(pred.abs().max()) if _fin(pred) else math.inf if torch.isinf(pred).any() else math.nan
        self._cur["params_absmax"] = max(float(p.detach().abs().max()) for p in pl_module.parameters())
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec = dict(pl_module.last_step_record)
        self._cur.update(raw_loss=rec.get("raw_loss"), grad_norm=rec.get("grad_norm_before_clip"),
                         params_finite_after=all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()),
                         grad_norm_after_clip=rec.get("grad_norm_after_clip"),
                         update_norm=float(torch.sqrt(sum(((p.detach().double() - b.double()) ** 2).sum()
                                                          for p, b in zip(pl_module.parameters(), self._before)))))
        self.rows.append(self._cur)
        self._cur = None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="ishigami")
    ap.add_argument("--fix", default="none")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--fold", type=int, required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--context", type=int, default=4, help="steps shown before the first non-finite one")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    for n in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(n).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cfg = reproduction_config(args.dataset, args.fix)
    ov = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.seed is not None:
        ov["training.seed"] = args.seed
    cfg = cfg.updated(ov)
    cb = NaNBirth()
    with tempfile.TemporaryDirectory() as tmp:
        res = run_kfold(cfg, folds=[args.fold], run_dir=tmp, progress=False, callbacks=[cb], keep_models=False)
    rows = cb.rows
    first = next((i for i, r in enumerate(rows) if r["fwd_first"] or r["bwd_nonfinite_order"]
                  or not (r["raw_loss"] is not None and math.isfinite(r["raw_loss"])) or not r["params_finite_after"]), None)
    window = rows[max(0, (first or 0) - args.context): (first or 0) + 2] if first is not None else rows[-3:]
    for r in window:
        print({k: (v[:4] if isinstance(v, list) else v) for k, v in r.items()})
    out = {"config": cfg.to_dict(), "fold": args.fold, "summary": res.fold_summary(args.fold),
           "first_event_index": first, "window": window, "steps": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
