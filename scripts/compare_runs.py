#!/usr/bin/env python
"""Run a shipped reproduction twice (two fixes, or the same one twice) and compare the histories.

Used for two checks of docs/findings.md:

* determinism: ``--fix-a none --fix-b none`` -> the two runs must be bitwise identical;
* the write-up's clip site: ``--fix-a none --fix-b dict-clip`` -> bitwise identical histories
  (Lightning never applies a ``gradient_clip_val`` returned by ``configure_optimizers``), and the
  warning Lightning raised.

Each run is one ``run_kfold`` over the requested folds (one thread). Columns compared: raw_loss,
train_loss, grad_norm_before_clip, grad_norm_after_clip, lr, loss_finite, params_finite (NaN == NaN
counts as equal). Also compares the final parameters of every fold bit for bit.

    .venv/bin/python scripts/compare_runs.py --dataset ishigami --fix-a none --fix-b dict-clip --out x.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from prot_lib.data import DATASETS
from prot_lib.training import run_kfold
from prot_lib.training.config import reproduction_config

COLS = ["raw_loss", "train_loss", "grad_norm_before_clip", "grad_norm_after_clip", "lr", "loss_finite", "params_finite"]


def run(dataset, fix, seed, folds):
    cfg = reproduction_config(dataset, fix)
    if seed is not None:
        cfg = cfg.updated({"training.seed": seed})
    with tempfile.TemporaryDirectory() as tmp:
        return run_kfold(cfg, folds=folds, run_dir=tmp, progress=False, keep_models=True, num_threads=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="ishigami", choices=DATASETS)
    ap.add_argument("--fix-a", default="none")
    ap.add_argument("--fix-b", default="none")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--folds", type=int, nargs="*")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    for n in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(n).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    a = run(args.dataset, args.fix_a, args.seed, args.folds)
    b = run(args.dataset, args.fix_b, args.seed, args.folds)
    ha, hb = a.history, b.history
    same_len = len(ha) == len(hb)
    cols = {}
    for c in COLS:
        if not same_len:
            cols[c] = False
            continue
        x, y = ha[c].to_numpy(), hb[c].to_numpy()
        if x.dtype.kind == "f":
            cols[c] = bool(np.array_equal(x, y, equal_nan=True))
        else:
            cols[c] = bool((x == y).all())
    params_equal = []
    for ma, mb in zip(a.models, b.models):
        sa, sb = ma.state_dict(), mb.state_dict()
        params_equal.append(all(torch.equal(torch.nan_to_num(sa[k], nan=12345.0), torch.nan_to_num(sb[k], nan=12345.0))
                                and torch.equal(torch.isnan(sa[k]), torch.isnan(sb[k])) for k in sa))
    out = {
        "dataset": args.dataset, "fix_a": args.fix_a, "fix_b": args.fix_b,
        "seed": a.config.training.seed, "folds": sorted(set(int(f) for f in ha["fold"])) if len(ha) else [],
        "n_steps": [len(ha), len(hb)],
        "history_columns_bitwise_equal": cols,
        "final_params_bitwise_equal_per_fold": params_equal,
        "summary_a": a.to_records(), "summary_b": b.to_records(),
        "warnings_a": sorted(set(w.split(": ", 1)[1] for w in a.warnings)),
        "warnings_b": sorted(set(w.split(": ", 1)[1] for w in b.warnings)),
        "max_grad_norm_before_clip_b": float(np.nanmax(np.where(np.isfinite(hb["grad_norm_before_clip"]), hb["grad_norm_before_clip"], np.nan))) if len(hb) else None,
    }
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(json.dumps({k: out[k] for k in ("seed", "folds", "n_steps", "history_columns_bitwise_equal",
                                           "final_params_bitwise_equal_per_fold", "warnings_a", "warnings_b")}, indent=1))
    print("first non-finite loss step per fold:", [r["first_nonfinite_loss_step"] for r in out["summary_a"]],
          [r["first_nonfinite_loss_step"] for r in out["summary_b"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
