#!/usr/bin/env python
"""Recount the fold fates of the shipped sweep results with the float64 gradient norm (issue 9 sec. 4).

Until the gradient norm was accumulated in float64 (``prot_lib/diagnostics/grads.py``), a step whose
gradients were all finite but whose float32 total norm overflowed (norm above ~1.8e19) was recorded as
``grad_finite = False``, so the fold's ``first_nonfinite_grad_step`` (and through it
``first_nonfinite_step``, ``fate``, ``KFoldResult.nan_folds`` and the write-up's pattern,
:mod:`prot_lib.training.fate`) counted a non-finite gradient that never was.

Recount without retraining: the float64 norm changes no trajectory (it is only measured; Lightning's
``gradient_clip_val`` clipping still uses its own norm), only which step is flagged. In these sweeps
(policy ``continue``) a really non-finite gradient makes the weights NaN at the same step (Adam's update
of an inf or NaN gradient is NaN; Lightning's norm clipping multiplies it by 0 and gets NaN), so a
``first_nonfinite_grad_step`` earlier than both the first non-finite loss and parameter steps was a
float32 overflow only. The float64 fate therefore takes ``first_nonfinite_step = min(loss step,
parameter step)``.

For every ``docs/findings/*.json`` with per-fold ``jobs`` (``scripts/seed_sweep.py``'s output), prints:
folds that "went NaN" (``first_nonfinite_step`` set) with the float32 and the float64 norm, how many
of them were float32 overflows only, how many first-NaN steps move later, and the write-up's pattern
(fold 0 never non-finite, a later fold non-finite) per seed with each norm.

Usage:
    .venv/bin/python scripts/recount_grad_overflow.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _step(v):
    return math.inf if v is None else int(v)


def recount(jobs):
    out = {"folds": len(jobs), "nan_float32": 0, "nan_float64": 0, "overflow_only": 0, "first_step_moved": 0}
    by_seed = defaultdict(dict)
    for j in jobs:
        loss, grad, par = (_step(j.get(k)) for k in ("first_nonfinite_loss_step", "first_nonfinite_grad_step",
                                                        "first_nonfinite_param_step"))
        first32 = min(loss, grad, par)
        first64 = min(loss, par)  # a grad step before both was a float32 overflow only
        out["nan_float32"] += first32 < math.inf
        out["nan_float64"] += first64 < math.inf
        out["overflow_only"] += grad < math.inf and first64 == math.inf
        out["first_step_moved"] += first32 < first64 < math.inf
        by_seed[j["seed"]][j["fold"]] = (first32 < math.inf, first64 < math.inf)
    for k, idx in (("pattern_float32", 0), ("pattern_float64", 1)):
        hits = [s for s, folds in by_seed.items()
                if 0 in folds and len(folds) > 1 and not folds[0][idx] and any(v[idx] for f, v in folds.items() if f)]
        out[k] = f"{len(hits)}/{sum(1 for folds in by_seed.values() if 0 in folds and len(folds) > 1)}"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args(argv)
    rows = {}
    for path in sorted((ROOT / "docs" / "findings").glob("*.json")):
        d = json.loads(path.read_text())
        if isinstance(d, dict) and d.get("jobs"):
            rows[path.name] = recount(d["jobs"])
    cols = ["folds", "nan_float32", "nan_float64", "overflow_only", "first_step_moved", "pattern_float32",
            "pattern_float64"]
    print(f"{'file':42s} " + " ".join(f"{c:>16s}" for c in cols))
    for name, r in rows.items():
        print(f"{name:42s} " + " ".join(f"{str(r[c]):>16s}" for c in cols))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
