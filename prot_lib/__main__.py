"""Command line: ``python -m prot_lib reproduce|run|data``.

- ``python -m prot_lib reproduce ishigami|dyconex|dyconex_long|dyconex_long_ci [--fix FIX] [--json]``:
  run a shipped reproduction (with one fix, e.g. ``--fix postnorm``, the write-up's final one, or all)
  and print a per-fold table (or JSON: a list of per-fold summaries).
- ``python -m prot_lib run CONFIG.yaml [--json]``: run any config file.
- ``reproduce``/``run`` ``--on-nonfinite continue|stop|skip|rollback`` overrides ``training.on_nonfinite``;
  when training stops on a non-finite step, the autopsy report is printed (``--json``: as a dict) and the
  exit status is 3.
- ``python -m prot_lib autopsy BUNDLE.pt [--json]``: replay a repro bundle written by a stopped run and
  print its autopsy report (exit 0: the non-finite value reappeared; 1: the replay stayed finite;
  2: not a readable bundle).
- ``python -m prot_lib data regenerate [--out DIR]``: rewrite the shipped data files.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _print_result(result, as_json: bool) -> None:
    records = result.to_records()
    if as_json:
        print(json.dumps(records, indent=2))
        return
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(f"run: {result.config.name}  (logs: {result.run_dir})")
        print(result.summary.to_string(index=False))
        if result.warnings:
            print("\nLightning warnings:")
            for w in dict.fromkeys(result.warnings):
                print("  " + w)


#: exit status of a run stopped by ``training.on_nonfinite`` (stop, or too many skips/rollbacks in a row)
EXIT_NONFINITE = 3


def _print_nonfinite(err, as_json: bool) -> None:
    if as_json:
        out = dict(err.report.summary()) if err.report is not None else {}
        out.update(error=str(err).splitlines()[0], bundle=str(err.bundle_path) if err.bundle_path else None)
        print(json.dumps(out, indent=2))
    else:
        print(str(err))
    print(f"error: training stopped at a non-finite step (fold {err.fold}, step {err.step}); "
          f"bundle: {err.bundle_path}", file=sys.stderr)


def _autopsy(path: str, as_json: bool) -> int:
    from .diagnostics.autopsy import autopsy_bundle
    from .training.config import ConfigError

    try:
        report = autopsy_bundle(path)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report.summary(), indent=2) if as_json else str(report))
    return 0 if report.reproduced else 1


def main(argv: Optional[List[str]] = None) -> int:
    from .training.config import FIXES, ConfigError, reproduction_datasets

    parser = argparse.ArgumentParser(prog="python -m prot_lib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run a shipped NaN reproduction, optionally with a fix")
    rep.add_argument("dataset", choices=reproduction_datasets())
    rep.add_argument("--fix", default="none", choices=FIXES,
                     help="one fix on top of the reproduction (postnorm: the write-up's final LayerNorm fix)")
    rep.add_argument("--folds", type=int, nargs="*", help="only these folds (default: all)")
    rep.add_argument("--seed", type=int, help="override training.seed")
    rep.add_argument("--json", action="store_true", help="print per-fold summaries as JSON")
    rep.add_argument("--run-dir", help="where CSV logs go (default runs/<name>/<time>-<random>)")
    policies = ["continue", "stop", "skip", "rollback"]
    rep.add_argument("--on-nonfinite", choices=policies, help="override training.on_nonfinite")
    run = sub.add_parser("run", help="run any config file")
    run.add_argument("config")
    run.add_argument("--json", action="store_true")
    run.add_argument("--run-dir")
    run.add_argument("--on-nonfinite", choices=policies, help="override training.on_nonfinite")
    aut = sub.add_parser("autopsy", help="replay a non-finite step's repro bundle and print its autopsy")
    aut.add_argument("bundle", help="a nonfinite_step<N>.pt file from <run_dir>/fold<k>/")
    aut.add_argument("--json", action="store_true")
    data = sub.add_parser("data", help="dataset utilities")
    data.add_argument("action", choices=["regenerate"])
    data.add_argument("--out", help="output folder (default: the repository's data/)")
    args = parser.parse_args(argv)

    if args.command == "data":
        from .data.generate import main as generate_main

        return generate_main(["--out", args.out] if args.out else [])

    _quiet_lightning()
    if args.command == "autopsy":
        return _autopsy(args.bundle, args.json)
    from .diagnostics.autopsy import NonFiniteTrainingError
    from .training import load_config, reproduction_config, run_kfold

    try:
        if args.command == "reproduce":
            cfg = reproduction_config(args.dataset, args.fix)
            if args.seed is not None:
                cfg = cfg.updated({"training.seed": args.seed})
            folds = args.folds
        else:
            cfg = load_config(args.config)
            folds = None
        if args.on_nonfinite is not None:
            cfg = cfg.updated({"training.on_nonfinite": args.on_nonfinite})
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = run_kfold(cfg, folds=folds, run_dir=args.run_dir, progress=not args.json and sys.stderr.isatty())
    except NonFiniteTrainingError as err:
        _print_nonfinite(err, args.json)
        return EXIT_NONFINITE
    _print_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
