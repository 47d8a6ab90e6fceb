#!/usr/bin/env python
"""The write-up's failure at the write-up's scale: the numbers behind docs/findings.md, section 5.

Parts (``--parts``, default all), each appended to the JSON file ``--out`` as soon as it is done (a
re-run skips the parts already there, so an interrupted run resumes):

* ``scale_map``: one Mamba block (d_model 100) fed s * N(0, 1) of shape (50, 1023, 100), s from 0.25
  to 48, for seeds 0-2: output RMS and max |y|, local exponents k(s), fixed points
  (:func:`prot_lib.diagnostics.scale.block_scale_map`, :func:`~prot_lib.diagnostics.scale.fixed_point`).
* ``growth``: freshly initialised stacks (4 blocks each) fed s * N(0, 1) of that shape, for several s
  and the variants of :data:`~prot_lib.diagnostics.scale.GROWTH_VARIANTS`: max |h| and RMS after every
  layer (:func:`~prot_lib.diagnostics.scale.growth_by_input_scale`).
* ``folds``: the shipped write-up-scale reproduction (``dyconex_long``): for each fold, the model as
  ``train_fold`` initialises it and the first training batch: per-layer statistics of both stacks and
  the write-up's debug lines rendered from them (:func:`~prot_lib.diagnostics.scale.writeup_debug_lines`);
  also with ``postnorm``.
* ``timing``: one thread: forward of one 4-block stack at (50, 1023, 100) without gradients, and one
  training step (forward + backward of the whole regressor, 8 blocks) at that shape; 2 repeats each,
  in wall seconds and in CPU seconds of the process (the cost on an idle core).
* ``train``: ``run_kfold(dyconex_long, folds=[0], max_steps=1)`` with and without ``postnorm``: the
  first non-finite step of fold 0 as the Trainer sees it, and its wall time.

``--shape 10 99 100 --dataset dyconex_long_ci`` gives the CI-size numbers.

    nice -n 10 .venv/bin/python scripts/writeup_mechanism.py --out docs/findings/writeup_mechanism.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SCALES_MAP = [0.25, 0.5, 1, 2, 4, 6, 8, 10, 12, 16, 24, 32, 48]
SCALES_GROWTH = [1, 4, 8, 10, 12, 16]


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def records(df):
    return [{k: _clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def part_scale_map(args):
    from prot_lib.diagnostics.scale import block_scale_map, fixed_point
    from prot_lib.models import Mamba

    out = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        block = Mamba(args.shape[-1], backend="torch")
        t0 = time.perf_counter()
        m = block_scale_map(block, SCALES_MAP, shape=tuple(args.shape), seed=seed)
        out.append({"seed": seed, "fixed_point_rms": fixed_point(m, "rms"), "fixed_point_max": fixed_point(m, "max"),
                    "wall_s": round(time.perf_counter() - t0, 1), "table": records(m)})
        print(f"scale_map seed {seed}: s*_rms {out[-1]['fixed_point_rms']:.3g}", file=sys.stderr, flush=True)
    return out


def part_growth(args):
    from prot_lib.diagnostics.scale import growth_by_input_scale

    t0 = time.perf_counter()
    g = growth_by_input_scale(SCALES_GROWTH, shape=tuple(args.shape), n_layers=4, seed=0, input_seed=1)
    return {"wall_s": round(time.perf_counter() - t0, 1), "rows": records(g)}


def _fold_models(args, fix):
    from prot_lib.data import load_dataset
    from prot_lib.training import fold_start, reproduction_config

    cfg = reproduction_config(args.dataset, fix)
    data = load_dataset(cfg.data.name)
    for fold in range(cfg.training.k_fold):
        model, x, _ = fold_start(cfg, fold, data)
        yield fold, model, x


def part_folds(args):
    from prot_lib.diagnostics.scale import layer_stats, overflow_layer, writeup_debug_lines

    out = []
    for fix in ("none", "postnorm"):
        for fold, model, x in _fold_models(args, fix):
            t0 = time.perf_counter()
            st = layer_stats(model, x)
            with torch.no_grad():
                pred = model(x)
            out.append({"fix": fix, "fold": fold, "batch_shape": list(x.shape),
                        "overflow_layer_forward": overflow_layer(st, "forward"),
                        "overflow_layer_backward": overflow_layer(st, "backward"),
                        "pred_max_abs": _clean(float(pred.abs().max())), "pred_finite": bool(torch.isfinite(pred).all()),
                        "stats": records(st),
                        "debug_lines": writeup_debug_lines(st, (x.shape[0], x.shape[1], model.embedding.out_features)),
                        "wall_s": round(time.perf_counter() - t0, 1)})
            print(f"folds {fix} fold {fold}: overflow fwd {out[-1]['overflow_layer_forward']} "
                  f"bwd {out[-1]['overflow_layer_backward']}", file=sys.stderr, flush=True)
    return out


def part_timing(args):
    from prot_lib.models import BiMambaStacks, S6Regressor

    torch.set_num_threads(1)
    b, L, d = args.shape
    torch.manual_seed(0)
    x = 0.5 * torch.randn(b, L, d)  # below the fixed point: finite, like a normalised input
    stack = BiMambaStacks(d, 4, backend="torch")
    fwd, fwd_cpu = [], []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            stack.run_stack("forward", x)
        fwd.append(time.perf_counter() - t0)
        fwd_cpu.append(time.process_time() - c0)
    model = S6Regressor(15, d_model=d, n_layers=4, backend="torch")
    tokens = 0.05 * torch.randn(b, L, 15)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps, steps_cpu = [], []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(tokens).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append(time.perf_counter() - t0)
        steps_cpu.append(time.process_time() - c0)
    # CPU seconds of this (one-thread) process: what the step costs on an idle core; wall seconds
    # grow with the machine's load (load_avg: 1, 5, 15 min).
    return {"threads": torch.get_num_threads(), "shape": [b, L, d], "forward_one_stack_wall_s": fwd,
            "forward_one_stack_cpu_s": fwd_cpu, "train_step_wall_s": steps, "train_step_cpu_s": steps_cpu,
            "load_avg": os.getloadavg()}


def part_train(args):
    from prot_lib.training import reproduction_config, run_kfold

    out = []
    for fix in ("none", "postnorm"):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            res = run_kfold(reproduction_config(args.dataset, fix), folds=[0], max_steps=1, run_dir=tmp,
                            keep_models=False, progress=False)
        out.append({"fix": fix, "summary": {k: _clean(v) for k, v in res.fold_summary(0).items()},
                    "history": records(res.history), "wall_s": round(time.perf_counter() - t0, 1)})
        print(f"train {fix}: {out[-1]['summary']}", file=sys.stderr, flush=True)
    return out


PARTS = {"scale_map": part_scale_map, "growth": part_growth, "folds": part_folds, "timing": part_timing,
         "train": part_train}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--shape", nargs=3, type=int, default=[50, 1023, 100], help="batch L d_model")
    ap.add_argument("--dataset", default="dyconex_long", help="reproduction for the folds/train parts")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.setdefault("meta", {"torch": torch.__version__, "shape": args.shape, "dataset": args.dataset,
                               "command": "scripts/writeup_mechanism.py " + " ".join(argv or sys.argv[1:])})
    for name in args.parts:
        if name in result:
            print(f"{name}: already in {out}, skipped", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        result[name] = PARTS[name](args)
        result.setdefault("wall_s", {})[name] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"{name}: done in {result['wall_s'][name]} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
