#!/usr/bin/env python
"""Summarise seed-sweep JSON files (scripts/seed_sweep.py) into one markdown table, medians not means.

Per file (one fix / setting): folds that went NaN (raw loss or a parameter non-finite), of them in
fold 0, the write-up's pattern (fold 0 finite, a later fold with a non-finite loss) per seed, the first
non-finite steps, and the fit of the folds that ended alive: the median val RMSE (and its quartiles)
over *live, not blown-up* folds, with blown-up folds counted apart.

A fold is **blown up** when its weights are finite at the end but its last val RMSE exceeds
``--blowup`` times the target's standard deviation (default 10): it diverged without reaching inf, so
a mean over folds would be dominated by it (chapter 9's "2.6e4 x the target std" cell was one such
fold among three live ones). The target std is that of the dataset's finite targets.

    .venv/bin/python scripts/fix_table.py docs/findings/stacks_ishigami_*.json --json docs/findings/stacks_fix_table.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def target_std(name: str) -> float:
    from prot_lib.data import load_dataset

    y = load_dataset(name).y.double()
    return float(y[~y.isnan()].std())


def summarise(path: Path, blowup: float, stds: dict) -> dict:
    d = json.loads(path.read_text())
    jobs = d["jobs"]
    cfg = d["config"]
    ds = cfg["data"]["name"]
    if ds not in stds:
        stds[ds] = target_std(ds)
    std = stds[ds]
    seeds = sorted({j["seed"] for j in jobs})
    nan = [j for j in jobs if j["nonfinite_any"]]
    live = [j for j in jobs if not j["nonfinite_any"] and j["final_val_rmse"] is not None]
    blown = [j for j in live if j["final_val_rmse"] > blowup * std]
    ok = sorted(j["final_val_rmse"] for j in live if j["final_val_rmse"] <= blowup * std)
    pattern = 0
    for s in seeds:
        by = {j["fold"]: j for j in jobs if j["seed"] == s}
        if 0 in by and not by[0]["nonfinite_any"] and any(by[f]["nonfinite_loss"] for f in by if f >= 1):
            pattern += 1
    steps = sorted(j["first_nonfinite_loss_step"] if j["first_nonfinite_loss_step"] is not None
                   else j["first_nonfinite_param_step"] for j in nan)

    def q(xs, p):
        return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))] if xs else None

    return {
        "file": path.name, "dataset": ds, "fix": d["args"].get("fix"), "set": d["args"].get("set"),
        "lr": cfg["training"]["lr"], "seeds": f"{seeds[0]}-{seeds[-1]}" if seeds else "", "n_seeds": len(seeds),
        "n_folds": len(jobs), "folds_nan": len(nan), "fold0_nan": sum(j["nonfinite_any"] for j in jobs if j["fold"] == 0),
        "n_fold0": sum(j["fold"] == 0 for j in jobs), "pattern": pattern,
        "first_nan_step_median": statistics.median(steps) if steps else None,
        "first_nan_step_range": [steps[0], steps[-1]] if steps else None,
        "n_live": len(live), "n_blown_up": len(blown), "blown_up_rmse": sorted(j["final_val_rmse"] for j in blown),
        "val_rmse_median": statistics.median(ok) if ok else None, "val_rmse_q25": q(ok, 0.25),
        "val_rmse_q75": q(ok, 0.75), "target_std": std,
        "rmse_over_std_median": (statistics.median(ok) / std) if ok else None,
        "logged_train_loss_finite_in_nan_folds": sum(bool(j.get("train_loss_all_finite")) for j in nan),
    }


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e4:
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.{nd}g}" if (abs(v) >= 1e4 or (v and abs(v) < 1e-2)) else f"{v:.{nd}f}"
    return str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--blowup", type=float, default=10.0, help="blown up: val RMSE > this x target std")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    stds: dict = {}
    rows = [summarise(Path(f), args.blowup, stds) for f in args.files]
    print("| file | lr | seeds | folds NaN | fold 0 NaN | pattern | first NaN step, median [range] | "
          "val RMSE of live folds, median [q25, q75] | / target std | blown-up folds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rng = r["first_nan_step_range"]
        print(f"| `{r['file']}` | {r['lr']:g} | {r['seeds']} | {r['folds_nan']}/{r['n_folds']} | "
              f"{r['fold0_nan']}/{r['n_fold0']} | {r['pattern']}/{r['n_seeds']} | "
              f"{fmt(r['first_nan_step_median'])} [{'-' if rng is None else f'{rng[0]}-{rng[1]}'}] | "
              f"{fmt(r['val_rmse_median'])} [{fmt(r['val_rmse_q25'])}, {fmt(r['val_rmse_q75'])}] | "
              f"{fmt(r['rmse_over_std_median'])} | {r['n_blown_up']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"blowup_factor": args.blowup, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
