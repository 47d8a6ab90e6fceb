#!/usr/bin/env python
"""How does an Ishigami fold of the write-up's model go NaN: layer-by-layer compounding, or the lr?

For each case (seed, fold[, lr, fix]) one fold is trained with a
:class:`prot_lib.diagnostics.ScaleRecorder` on the embedding, every Mamba block of both stacks and the
whole model (the prediction), so every optimizer step leaves max |output| per block. The summary per
case:

* ``first_nonfinite_step`` (raw loss) and the step ``last_finite`` before it;
* ``profile``: max |output| of the embedding, of forward blocks 0-3, backward blocks 0-3 and of the
  prediction at a few steps (0, 25 %, 50 %, 75 % of the run, and the 5 steps before the NaN);
* ``gain``: per block, max |out| / max |in| at those steps (the input of block i is block i-1's output;
  > 1 means the block amplifies, and a run of gains > 1 that rise from block to block is the
  compounding of the write-up's log);
* ``first_nonfinite_module``: which recorded output went non-finite first at the NaN step.

    nice -n 10 .venv/bin/python scripts/ishigami_mechanism.py --cases 0:3 0:4 0:0 --lr 2e-2 \\
        --out docs/findings/stacks_ishigami_mechanism_lr2e-2.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _clean(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else (
        str(v) if isinstance(v, float) and math.isinf(v) else v)


def run_case(dataset, fix, seed, fold, sets):
    import torch

    from prot_lib.diagnostics import ScaleRecorder
    from prot_lib.training import reproduction_config, run_kfold

    torch.set_num_threads(1)
    cfg = reproduction_config(dataset, fix).updated({**sets, "training.seed": seed})
    n = cfg.model.n_layers
    if cfg.model.topology == "stacks":
        blocks = [f"model.bimamba.{side}_layers.{i}" for side in ("forward", "backward") for i in range(n)]
    else:
        blocks = [f"model.bimamba.layers.{i}" for i in range(n)]
    names = ["model.embedding", *blocks, "model"]
    rec = ScaleRecorder(names)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_kfold(cfg, folds=[fold], run_dir=tmp, callbacks=[rec], keep_models=False, progress=False)
    t = rec.table
    wide = t.pivot_table(index="step", columns="module", values="max_abs", aggfunc="last")[names]
    bad = t.pivot_table(index="step", columns="module", values="nonfinite", aggfunc="last")[names]
    s = res.fold_summary(fold)
    nan_step = s["first_nonfinite_loss_step"]
    steps_all = list(wide.index)
    last = (nan_step - 1) if nan_step is not None else steps_all[-1]
    picks = sorted({0, steps_all[len(steps_all) // 4], steps_all[len(steps_all) // 2],
                    steps_all[3 * len(steps_all) // 4], *[st for st in range(last - 4, last + 1) if st >= 0],
                    *([nan_step] if nan_step is not None else [])} & set(steps_all))
    profile = {int(st): {k: _clean(float(v)) for k, v in wide.loc[st].items()} for st in picks}
    gains = {}
    if cfg.model.topology == "stacks":
        for st in picks:
            row = wide.loc[st]
            g = {}
            for side in ("forward", "backward"):
                prev = row["model.embedding"]
                for i in range(n):
                    cur = row[f"model.bimamba.{side}_layers.{i}"]
                    g[f"{side}.{i}"] = _clean(float(cur / prev)) if prev and math.isfinite(prev) else None
                    prev = cur
            gains[int(st)] = g
    first_bad = None
    if nan_step is not None and nan_step in bad.index:
        for m in names:  # forward order within each stack
            if bad.loc[nan_step, m] > 0:
                first_bad = m
                break
    return {"dataset": dataset, "fix": fix, "seed": seed, "fold": fold, "sets": sets, "summary": s,
            "last_finite_step": last, "profile": profile, "gain": gains, "first_nonfinite_module": first_bad,
            "scales_all_steps": {int(st): {k: _clean(float(v)) for k, v in wide.loc[st].items()} for st in steps_all}}


def main(argv=None):
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="ishigami")
    ap.add_argument("--fix", default="none")
    ap.add_argument("--cases", nargs="+", required=True, help="seed:fold, e.g. 0:3")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sets = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.lr is not None:
        sets["training.lr"] = args.lr
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"cases": []}
    done = {(c["seed"], c["fold"], json.dumps(c["sets"], sort_keys=True), c["fix"]) for c in result["cases"]}
    for case in args.cases:
        seed, fold = (int(v) for v in case.split(":"))
        if (seed, fold, json.dumps(sets, sort_keys=True), args.fix) in done:
            continue
        r = run_case(args.dataset, args.fix, seed, fold, sets)
        result["cases"].append(r)
        out.write_text(json.dumps(result, indent=1))
        print(f"seed {seed} fold {fold}: NaN step {r['summary']['first_nonfinite_loss_step']} first bad "
              f"{r['first_nonfinite_module']}", file=sys.stderr, flush=True)
        last = r["last_finite_step"]
        if last in r["profile"]:
            print("  last finite step", last, {k.replace('model.bimamba.', ''): f"{v:.3g}" if isinstance(v, float) else v
                                               for k, v in r["profile"][last].items()}, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
