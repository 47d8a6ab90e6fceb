#!/usr/bin/env python
"""Where does the Dyconex NaN come from? Separate the causes with small data variants.

Each variant changes one thing about the Dyconex stand-in's tensors, then

1. builds the fold-0 model exactly as ``train_fold`` does (``seed_everything(seed + 0)``, same loader
   order), runs ONE forward + backward on the first training batch, watched by
   :func:`prot_lib.diagnostics.probes.probe_step` (a hook on every module, a wrapper around each Mamba
   block's selective scan), and reports the first tensor that is non-finite, in execution order
   (module name, input or output), plus the largest |value| per module;
2. trains fold 0 for the config's epochs and reports the first non-finite step and the val RMSE.

Variants (raw = as shipped: raw units, raw Unix timestamps, NaN inputs and NaN targets):

    raw                 as shipped
    raw_y_dropped       rows with a NaN target removed (inputs untouched)
    raw_x_zeroed        NaN inputs -> 0 and rows with a NaN target removed: only the raw scales remain
    ts_hours            as raw_x_zeroed, timestamps -> hours since the chain start (values raw)
    values_std          as raw_x_zeroed, values standardised per variable (timestamps raw)
    std_nan_x           everything standardised (training rows of fold 0), NaN inputs put back,
                        NaN-target rows removed: only NaN inputs remain
    std_nan_y           everything standardised, NaN inputs -> 0 (+ indicators), NaN targets kept
                        and the loss NOT masked: only NaN targets remain
    std                 fully standardised, NaN-target rows removed (the fix's data, no mask needed)

Usage::

    .venv/bin/python scripts/dyconex_nan_probe.py --out docs/findings/dyconex_probe.json
    .venv/bin/python scripts/dyconex_nan_probe.py --variants raw_x_zeroed --set model.norm=layernorm
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from prot_lib.data import load_dataset  # noqa: E402
from prot_lib.diagnostics.probes import probe_step, tensor_summary  # noqa: E402
from prot_lib.experiments import quiet_lightning  # noqa: E402
from prot_lib.training import run_kfold  # noqa: E402
from prot_lib.training.config import reproduction_config  # noqa: E402
from prot_lib.training.kfold import fold_indices, make_loaders  # noqa: E402
from prot_lib.training.module import NaNStudyModule  # noqa: E402

VARIANTS = ["raw", "raw_y_dropped", "raw_x_zeroed", "ts_hours", "values_std", "std_nan_x", "std_nan_y", "std"]


def make_variant(data, name: str, train_idx):
    """Return (SequenceData, note) for one variant; indices refer to ``data``'s rows."""
    x, y = data.x.clone(), data.y.clone()
    names = list(data.feature_names)
    vi, ti = names.index("value"), names.index("timestamp")
    has_y = ~torch.isnan(y)
    if name == "raw":
        return data, "as shipped"
    if name == "raw_y_dropped":
        return data.subset(has_y), "rows with NaN target removed"
    if name in ("raw_x_zeroed", "ts_hours", "values_std"):
        x = torch.nan_to_num(x, nan=0.0)
        if name == "ts_hours":
            ts = data.x[:, :, ti]
            x[:, :, ti] = (ts - ts.amin(dim=1, keepdim=True)) / 3600.0
        if name == "values_std":
            std = data.normalized(train_idx)
            x[:, :, vi] = std.x[:, :, std.feature_names.index("value")]
        d = type(data)(name=data.name, x=x, y=y, feature_names=names, meta=dict(data.meta))
        return d.subset(has_y), "NaN inputs -> 0, NaN-target rows removed"
    std = data.normalized(train_idx)
    if name == "std_nan_x":
        xs = std.x.clone()
        xs[:, :, std.feature_names.index("value")] = torch.where(
            torch.isnan(data.x[:, :, vi]), torch.full_like(xs[:, :, 0], float("nan")), xs[:, :, std.feature_names.index("value")])
        d = type(data)(name=data.name, x=xs, y=y, feature_names=std.feature_names, meta=dict(std.meta))
        return d.subset(has_y), "standardised, NaN inputs put back, NaN-target rows removed"
    if name == "std_nan_y":
        return std, "standardised (+indicators), NaN targets kept, loss not masked"
    if name == "std":
        return std.subset(has_y), "standardised (+indicators), NaN-target rows removed"
    raise SystemExit(f"unknown variant {name}")


def first_batch_probe(cfg, data, train_idx, val_idx, fold=0):
    """One watched forward/backward on the first training batch of ``fold``; returns a dict."""
    t = cfg.training
    pl.seed_everything(t.seed + fold, workers=True, verbose=False)
    train_dl, _ = make_loaders(data, train_idx, val_idx, t.batch_size, t.seed + fold)
    module = NaNStudyModule(cfg, n_features=data.x.shape[-1])
    x, y = next(iter(train_dl))
    batch_info = {"x": tensor_summary(x), "y": tensor_summary(y),
                  "rows_with_nan_x": int(torch.isnan(x).flatten(1).any(1).sum()), "n_nan_y": int(torch.isnan(y).sum())}
    seen = {}

    def step():  # the module's own training loss (masking, sanitisation as configured)
        loss, raw_loss, pred, _, _ = module._step((x, y), "train")
        seen.update(raw_loss=float(raw_loss), pred=tensor_summary(pred))
        return loss

    probe = probe_step(module.model, step)
    return {"batch": batch_info, "first_nonfinite": probe["first_nonfinite"], "pred": seen["pred"],
            "raw_loss": seen["raw_loss"], "loss": probe["loss"],
            **{k: probe[k] for k in ("per_module_output_absmax", "per_module_output_finite",
                                     "n_params_nonfinite_grad", "first_param_nonfinite_grad")}}


def main(argv=None):
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--fix", default="none")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-train", action="store_true", help="only the first-batch probe")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    cfg = reproduction_config("dyconex", args.fix)
    ov = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    ov["training.seed"] = args.seed
    cfg = cfg.updated(ov)
    if cfg.data.normalize:
        raise SystemExit("use variants instead of data.normalize here")
    raw = load_dataset("dyconex")
    y_all = raw.y[~torch.isnan(raw.y)]
    out = {"config": cfg.to_dict(), "y_std": float(y_all.std()), "y_mean": float(y_all.mean()), "variants": {}}
    for v in args.variants:
        tr0, va0 = fold_indices(len(raw), cfg.training.k_fold, cfg.training.seed)[0]
        data, note = make_variant(raw, v, tr0)
        # folds over the variant's own rows (rows may have been dropped)
        tr, va = fold_indices(len(data), cfg.training.k_fold, cfg.training.seed)[0]
        rec = {"note": note, "n_rows": len(data), "n_features": data.x.shape[-1]}
        rec["probe"] = first_batch_probe(cfg, data, tr, va)
        if not args.no_train:
            with tempfile.TemporaryDirectory() as tmp, quiet_lightning():
                res = run_kfold(cfg, folds=[0], data=data, run_dir=tmp, progress=False, keep_models=True)
            s = res.fold_summary(0)
            h = res.history
            preds = None
            with torch.no_grad():
                m = res.models[0].eval()
                p = m(data.x[va])
                preds = {"std_of_val_predictions": float(p.std()) if torch.isfinite(p).all() else None}
            rec["train"] = {**s, **preds, "val_rmse_per_epoch": [float(r) for r in res.epochs["val_rmse"]],
                            "last_raw_loss": float(h["raw_loss"].iloc[-1]) if len(h) else None}
        fb = rec["probe"]["first_nonfinite"]
        print(f"{v:14s} first non-finite: {fb['module'] + ' ' + fb['non_finite'] if fb else None}; "
              f"pred={rec['probe']['pred']}; "
              f"train: {({k: rec['train'][k] for k in ('first_nonfinite_loss_step', 'final_val_rmse', 'std_of_val_predictions')} if 'train' in rec else '-')}",
              flush=True)
        out["variants"][v] = rec
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
