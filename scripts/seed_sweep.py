#!/usr/bin/env python
"""Seed sweep: how often does a reproduction (with or without a fix) go NaN, fold by fold?

Every (seed, fold) pair is an independent job: ``run_kfold(cfg, folds=[fold])`` in a worker
process with one torch thread. A fold's fate does not depend on the other folds (each fold
re-seeds with ``seed + fold`` and builds a fresh model), so this gives the same per-fold results
as one ``run_kfold`` over all folds, only in parallel.

Examples::

    .venv/bin/python scripts/seed_sweep.py --dataset ishigami --seeds 0-9 --jobs 2 --out /tmp/sweep.json
    .venv/bin/python scripts/seed_sweep.py --dataset ishigami --fix clip --seeds 0 1 2 \\
        --set training.lr=0.02 --set model.n_layers=5 --out /tmp/clip.json
    .venv/bin/python scripts/seed_sweep.py --config my.yaml --seeds 0-4 --folds 0

Output JSON: ``config`` (the resolved config of seed 0 / the first seed), ``args``, ``jobs`` (one
record per (seed, fold): the fold summary of :class:`prot_lib.training.kfold.KFoldResult` plus a few
history statistics and the wall time), ``per_seed`` and ``rates``:

* ``p_fold_nonfinite``: fraction of (seed, fold) jobs with a non-finite raw loss or parameter
  (``p_fold_nonfinite_loss``: non-finite raw loss only), also split into fold 0 and folds >= 1.
  A non-finite *total gradient norm* alone does not count: that float32 norm overflows to inf above
  ~1.8e19 while every gradient element is finite (``grad_norm_inf_only`` marks such folds);
* ``pattern_rate``: fraction of seeds where fold 0 stays finite (loss and parameters) AND
  at least one later fold has a non-finite raw training loss: the write-up's pattern;
* ``any_nonfinite_rate``: fraction of seeds with any non-finite fold.

Resuming: with ``--out OUT.json`` every finished (seed, fold) record is appended at once to
``OUT.json.jobs.jsonl``; a re-run with the same arguments skips the jobs found there, so an
interrupted sweep continues where it stopped. The final JSON is written when all jobs are done.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_seeds(items):
    """["0-4", "7"] -> [0, 1, 2, 3, 4, 7]."""
    out = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    return list(dict.fromkeys(out))


def parse_sets(items):
    """["training.lr=0.02", "model.norm=null"] -> {"training.lr": 0.02, "model.norm": None}."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_config(args, seed: int):
    from prot_lib.training.config import config_from_dict, deep_merge, fix_overlay, load_config, reproduction_config, _read_yaml

    if args.config:
        base = _read_yaml(Path(args.config))
        cfg = config_from_dict(deep_merge(base, fix_overlay(args.fix)), source=f"{args.config} + fix {args.fix}")
    else:
        cfg = reproduction_config(args.dataset, args.fix)
    overrides = dict(parse_sets(args.set))
    overrides["training.seed"] = seed
    return cfg.updated(overrides)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def run_job(job):
    """Worker: one (seed, fold). Returns a JSON-ready dict."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from prot_lib.training import run_kfold

    args, seed, fold = job["args"], job["seed"], job["fold"]
    cfg = build_config(argparse.Namespace(**args), seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sweep_") as tmp:
        res = run_kfold(cfg, folds=[fold], run_dir=tmp, progress=False, keep_models=False, num_threads=1)
    wall = time.perf_counter() - t0
    rec = res.fold_summary(fold)
    h = res.history
    extra = {}
    if len(h):
        finite_loss = h["raw_loss"].map(lambda v: math.isfinite(v))
        extra["max_finite_raw_loss"] = float(h.loc[finite_loss, "raw_loss"].max()) if finite_loss.any() else None
        g = h["grad_norm_before_clip"]
        gf = g[g.map(math.isfinite)]
        extra["max_finite_grad_norm"] = float(gf.max()) if len(gf) else None
        extra["median_grad_norm"] = float(gf.median()) if len(gf) else None
        tl = h["train_loss"]
        extra["train_loss_all_finite"] = bool(tl.map(math.isfinite).all())
        bad_tl = h.loc[~tl.map(math.isfinite), "step"]
        extra["first_nonfinite_train_loss_step"] = int(bad_tl.iloc[0]) if len(bad_tl) else None
        extra["last_train_loss"] = float(tl.iloc[-1])
        clip = cfg.training.gradient_clip_val
        if clip and cfg.training.clip_via == "trainer":
            extra["frac_steps_clipped"] = float((gf > clip).mean()) if len(gf) else None
        # the logged lr at the first non-finite step (to judge warmup)
        s = rec.get("first_nonfinite_loss_step")
        if s is not None:
            row = h.loc[h["step"] == s]
            extra["lr_at_first_nonfinite_loss"] = float(row["lr"].iloc[0]) if len(row) else None
    e = res.epochs
    extra["val_rmse_per_epoch"] = [float(v) if math.isfinite(v) else None for v in e["val_rmse"]] if len(e) else []
    extra["best_finite_val_rmse"] = min([v for v in extra["val_rmse_per_epoch"] if v is not None], default=None)
    warn = sorted({w.split(": ", 1)[1][:160] for w in res.warnings if "unsupported keys" in w or "gradient_clip" in w})
    rec = {"seed": seed, "fold": fold, **rec, **extra, "warnings": warn, "wall_s": round(wall, 2)}
    # A fold "goes NaN" when its raw training loss or a parameter becomes non-finite. The history's
    # grad_finite flag alone is not used: it is the float32 total gradient norm, which overflows to inf
    # (above ~1.8e19) while every gradient element is still finite.
    rec["nonfinite_any"] = any(rec.get(k) is not None for k in ("first_nonfinite_loss_step", "first_nonfinite_param_step"))
    rec["grad_norm_inf_only"] = rec.get("first_nonfinite_grad_step") is not None and not rec["nonfinite_any"]
    rec["nonfinite_loss"] = rec.get("first_nonfinite_loss_step") is not None
    if rec["final_val_rmse"] is not None and not _finite(rec["final_val_rmse"]):
        rec["final_val_rmse"] = None
    return rec


def rates(jobs, seeds, folds):
    by = {(j["seed"], j["fold"]): j for j in jobs}
    per_seed = []
    for s in seeds:
        rows = [by[(s, f)] for f in folds if (s, f) in by]
        bad = [r["fold"] for r in rows if r["nonfinite_any"]]
        bad_loss = [r["fold"] for r in rows if r["nonfinite_loss"]]
        f0 = by.get((s, 0))
        fold0_finite = None if f0 is None else (not f0["nonfinite_any"])
        later_nan = [f for f in bad_loss if f >= 1]
        pattern = bool(fold0_finite) and bool(later_nan) if f0 is not None else None
        first_steps = {r["fold"]: r["first_nonfinite_loss_step"] for r in rows if r["nonfinite_loss"]}
        finite_rmse = [r["final_val_rmse"] for r in rows if not r["nonfinite_any"] and r["final_val_rmse"] is not None]
        per_seed.append({
            "seed": s, "nonfinite_folds": bad, "nonfinite_loss_folds": bad_loss,
            "first_nonfinite_loss_step": first_steps, "fold0_finite": fold0_finite, "pattern": pattern,
            "mean_val_rmse_finite_folds": (sum(finite_rmse) / len(finite_rmse)) if finite_rmse else None,
        })

    def frac(xs):
        xs = list(xs)
        return {"k": int(sum(bool(x) for x in xs)), "n": len(xs),
                "rate": (sum(bool(x) for x in xs) / len(xs)) if xs else None}

    all_rmse = [j["final_val_rmse"] for j in jobs if not j["nonfinite_any"] and j["final_val_rmse"] is not None]
    first_steps = sorted(j["first_nonfinite_loss_step"] for j in jobs if j["nonfinite_loss"])
    out = {
        "p_fold_nonfinite": frac(j["nonfinite_any"] for j in jobs),
        "p_fold_nonfinite_loss": frac(j["nonfinite_loss"] for j in jobs),
        "p_fold0_nonfinite": frac(j["nonfinite_any"] for j in jobs if j["fold"] == 0),
        "p_later_fold_nonfinite": frac(j["nonfinite_any"] for j in jobs if j["fold"] >= 1),
        "any_nonfinite_rate": frac(bool(p["nonfinite_folds"]) for p in per_seed),
        "first_nonfinite_loss_steps": first_steps,
        "mean_val_rmse_finite_folds": (sum(all_rmse) / len(all_rmse)) if all_rmse else None,
        "median_val_rmse_finite_folds": statistics.median(all_rmse) if all_rmse else None,
        "n_finite_folds": len(all_rmse),
        "n_grad_norm_inf_only": sum(bool(j.get("grad_norm_inf_only")) for j in jobs),
    }
    if 0 in folds and len(folds) > 1:
        out["pattern_rate"] = frac(p["pattern"] for p in per_seed)
    return per_seed, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    from prot_lib.training.config import reproduction_datasets

    ap.add_argument("--dataset", choices=reproduction_datasets(), default="ishigami")
    ap.add_argument("--config", help="a YAML config instead of the shipped <dataset>_unmitigated.yaml")
    ap.add_argument("--fix", default="none")
    ap.add_argument("--seeds", nargs="+", default=["0-9"], help="e.g. 0-9 or 0 3 5")
    ap.add_argument("--folds", nargs="+", type=int, help="default: all k_fold folds")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, dotted key, YAML value (repeatable): training.lr=0.02")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", help="write the JSON here (default: stdout only gets the rates)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    seeds = parse_seeds(args.seeds)
    cfg0 = build_config(args, seeds[0])
    folds = args.folds if args.folds is not None else list(range(cfg0.training.k_fold))
    arg_dict = {k: v for k, v in vars(args).items() if k in ("dataset", "config", "fix", "set")}
    todo = [{"args": arg_dict, "seed": s, "fold": f} for s in seeds for f in folds]
    t0 = time.perf_counter()
    jobs = []
    partial = Path(args.out + ".jobs.jsonl") if args.out else None
    if partial is not None and partial.is_file():
        for line in partial.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("sweep_args") == arg_dict and {"seed": rec["seed"], "fold": rec["fold"]} in \
                    [{"seed": j["seed"], "fold": j["fold"]} for j in todo]:
                jobs.append(rec)
        done = {(j["seed"], j["fold"]) for j in jobs}
        todo = [j for j in todo if (j["seed"], j["fold"]) not in done]
        print(f"resuming: {len(done)} jobs found in {partial}, {len(todo)} to run", file=sys.stderr)
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=max(1, args.jobs)) as pool:
        for rec in pool.imap_unordered(run_job, todo):
            rec["sweep_args"] = arg_dict
            jobs.append(rec)
            if partial is not None:
                partial.parent.mkdir(parents=True, exist_ok=True)
                with partial.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            if not args.quiet:
                print(f"seed {rec['seed']:>3} fold {rec['fold']}: nonfinite_loss_step={rec['first_nonfinite_loss_step']} "
                      f"param_step={rec['first_nonfinite_param_step']} val_rmse={rec['final_val_rmse']} "
                      f"({rec['wall_s']} s)", file=sys.stderr, flush=True)
    jobs.sort(key=lambda j: (j["seed"], j["fold"]))
    per_seed, rate = rates(jobs, seeds, folds)
    import torch

    result = {
        "args": {**arg_dict, "seeds": seeds, "folds": folds, "jobs": args.jobs},
        "config": cfg0.updated({"training.seed": seeds[0]}).to_dict(),
        "torch": torch.__version__,
        "wall_s_total": round(time.perf_counter() - t0, 1),
        "rates": rate,
        "per_seed": per_seed,
        "jobs": jobs,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"rates": rate, "per_seed": [{k: p[k] for k in ("seed", "nonfinite_folds", "first_nonfinite_loss_step", "pattern")} for p in per_seed]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
