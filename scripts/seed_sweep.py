#!/usr/bin/env python
"""Seed sweep: how often does a reproduction (with or without a fix) go NaN, fold by fold?

A thin command line over :mod:`prot_lib.experiments.seeds`: every (seed, fold) pair is one cell of the
sweep engine (``run_kfold(cfg, folds=[fold])`` in a worker process with one torch thread; a fold's fate
does not depend on the other folds), and the rates read each fold's fate (:mod:`prot_lib.training.fate`).

Examples::

    .venv/bin/python scripts/seed_sweep.py --dataset ishigami --seeds 0-9 --jobs 2 --out /tmp/sweep.json
    .venv/bin/python scripts/seed_sweep.py --dataset ishigami --fix clip --seeds 0 1 2 \\
        --set training.lr=0.02 --set model.n_layers=5 --out /tmp/clip.json
    .venv/bin/python scripts/seed_sweep.py --config my.yaml --seeds 0-4 --folds 0
    .venv/bin/python scripts/seed_sweep.py --seeds 0-19 --engine dask --scheduler tcp://10.0.0.5:8786

With ``--out OUT.json`` every finished (seed, fold) is stored at once in ``OUT.json.cells/``; the same
command run again skips the cells found there, so an interrupted sweep continues where it stopped.

Output JSON: ``args``, ``config`` (the resolved config of the first seed), ``torch``, ``wall_s_total``,
``rates`` and ``per_seed`` (:func:`prot_lib.experiments.seed_rates`: ``p_fold_nonfinite``, ``p_fold_dead``,
``pattern_rate``, ...), ``jobs`` (one record per (seed, fold): the engine's row, i.e. the fold's fate and
a few history magnitudes).

A fold counts as non-finite when its fate's ``first_nonfinite_step`` is set: a loss, a gradient or a
weight went inf/NaN. (Files in ``docs/findings/`` written before the fate existed counted only the loss
and the weights; their ``n_grad_norm_inf_only`` says how many folds that leaves out.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from prot_lib.experiments import grid_cells, seed_rates, seed_sweep  # noqa: E402
from prot_lib.experiments.specs import parse_seeds  # noqa: E402
from prot_lib.training.config import FIXES, load_config, reproduction_datasets  # noqa: E402


def parse_sets(items):
    """["training.lr=0.02", "model.norm=null"] -> {"training.lr": 0.02, "model.norm": None}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _plain(v):
    """A table value as JSON: NaN and pandas' NA -> None, numpy scalars -> Python."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=reproduction_datasets(), default="ishigami")
    ap.add_argument("--config", help="a YAML config instead of the shipped <dataset>_unmitigated.yaml")
    ap.add_argument("--fix", default="none", choices=FIXES)
    ap.add_argument("--seeds", nargs="+", default=["0-9"], help="e.g. 0-9 or 0 3 5")
    ap.add_argument("--folds", nargs="+", type=int, help="default: all k_fold folds")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, dotted key, YAML value (repeatable): training.lr=0.02")
    ap.add_argument("--max-steps", type=int, default=-1, help="optimizer steps per fold (-1: the config's epochs)")
    ap.add_argument("--jobs", type=int, help="worker processes (default: every core)")
    ap.add_argument("--engine", choices=["local", "dask"], default="local")
    ap.add_argument("--scheduler", help="with --engine dask: a running scheduler's address")
    ap.add_argument("--out", help="write the JSON here (and the per-cell results to OUT.cells/)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    seeds = parse_seeds(",".join(args.seeds))
    base = load_config(args.config) if args.config else args.dataset
    overrides = parse_sets(args.set)
    t0 = time.perf_counter()
    rows = seed_sweep(base, seeds, folds=args.folds, fix=args.fix, overrides=overrides, max_steps=args.max_steps,
                      engine=args.engine, scheduler=args.scheduler, n_jobs=args.jobs,
                      out=(args.out + ".cells") if args.out else None, progress=False if args.quiet else None)
    per_seed, rates = seed_rates(rows)
    arg_dict = {k: v for k, v in vars(args).items() if k in ("dataset", "config", "fix", "set", "max_steps")}
    folds = sorted(int(f) for f in rows["fold"].unique())
    cfg0 = grid_cells(base, fixes=(args.fix,), seeds=seeds[:1], folds=folds[:1], overrides=overrides)[0].config
    result = {
        "args": {**arg_dict, "seeds": seeds, "folds": folds, "jobs": args.jobs, "engine": args.engine},
        "config": cfg0.to_dict(),
        "torch": torch.__version__,
        "wall_s_total": round(time.perf_counter() - t0, 1),
        "rates": rates,
        "per_seed": [{k: _plain(v) if not isinstance(v, (list, dict)) else v for k, v in r.items()}
                     for r in per_seed.to_dict("records")],
        "jobs": [{k: _plain(v) for k, v in r.items()} for r in rows.to_dict("records")],
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"rates": rates, "per_seed": [
        {k: p[k] for k in ("seed", "nonfinite_folds", "first_nonfinite_step", "pattern")} for p in result["per_seed"]]},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
