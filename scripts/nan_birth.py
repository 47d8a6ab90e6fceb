#!/usr/bin/env python
"""Where is the first non-finite number of a diverging fold born? One fold, watched at every step.

Trains one fold of a shipped reproduction (same seeds, same batches as ``run_kfold``) with
:class:`prot_lib.diagnostics.probes.StepProbe`, which records at every training step the first module
(or selective scan) whose output went inf/NaN and whether its input was still finite, the order in
which parameters received a non-finite gradient (nearest the loss first), and the norm of the weight
update (float64); joins it with the run's history (raw loss, gradient norms) and prints the steps
around the first non-finite one.

    .venv/bin/python scripts/nan_birth.py --dataset ishigami --seed 0 --fold 2 --out x.json
"""
from __future__ import annotations

import argparse
import json
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

import yaml  # noqa: E402

from prot_lib.data import DATASETS  # noqa: E402
from prot_lib.diagnostics.probes import StepProbe  # noqa: E402
from prot_lib.experiments import quiet_lightning  # noqa: E402
from prot_lib.training import reproduction_config, run_kfold  # noqa: E402


def watched_fold(cfg, fold: int):
    """(run, per-step rows): the probe's rows joined with the history's raw loss and gradient norms."""
    probe = StepProbe()
    with tempfile.TemporaryDirectory() as tmp, quiet_lightning():
        res = run_kfold(cfg, folds=[fold], run_dir=tmp, progress=False, callbacks=[probe], keep_models=False)
    hist = res.history.set_index("step")
    rows = []
    for r in probe.rows:
        h = hist.loc[r["step"]] if r["step"] in hist.index else {}
        rows.append({**r, "pred_absmax": r["output_absmax"].get("model"),
                     "raw_loss": float(h["raw_loss"]) if len(h) else None,
                     "grad_norm": float(h["grad_norm_before_clip"]) if len(h) else None,
                     "grad_norm_after_clip": float(h["grad_norm_after_clip"]) if len(h) else None})
    return res, rows


def first_event(rows):
    """Index of the first step with a non-finite forward output, gradient, loss or weight (None: none)."""
    return next((i for i, r in enumerate(rows) if r["fwd_first"] or r["bwd_nonfinite_order"]
                 or not (r["raw_loss"] is not None and math.isfinite(r["raw_loss"])) or not r["params_finite_after"]),
                None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="ishigami", choices=DATASETS)
    ap.add_argument("--fix", default="none")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--fold", type=int, required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--context", type=int, default=4, help="steps shown before the first non-finite one")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    ov = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.seed is not None:
        ov["training.seed"] = args.seed
    cfg = reproduction_config(args.dataset, args.fix).updated(ov)
    res, rows = watched_fold(cfg, args.fold)
    first = first_event(rows)
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
