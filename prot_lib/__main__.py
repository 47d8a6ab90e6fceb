"""Command line: ``python -m prot_lib reproduce|run|data``.

- ``python -m prot_lib reproduce ishigami|dyconex [--fix FIX] [--json]``: run a shipped reproduction
  (with one fix, or all) and print a per-fold table (or JSON: a list of per-fold summaries).
- ``python -m prot_lib run CONFIG.yaml [--json]``: run any config file.
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


def main(argv: Optional[List[str]] = None) -> int:
    from .training.config import FIXES, ConfigError

    parser = argparse.ArgumentParser(prog="python -m prot_lib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run a shipped NaN reproduction, optionally with a fix")
    rep.add_argument("dataset", choices=["ishigami", "dyconex"])
    rep.add_argument("--fix", default="none", choices=FIXES)
    rep.add_argument("--folds", type=int, nargs="*", help="only these folds (default: all)")
    rep.add_argument("--seed", type=int, help="override training.seed")
    rep.add_argument("--json", action="store_true", help="print per-fold summaries as JSON")
    rep.add_argument("--run-dir", help="where CSV logs go (default runs/<name>)")
    run = sub.add_parser("run", help="run any config file")
    run.add_argument("config")
    run.add_argument("--json", action="store_true")
    run.add_argument("--run-dir")
    data = sub.add_parser("data", help="dataset utilities")
    data.add_argument("action", choices=["regenerate"])
    data.add_argument("--out", help="output folder (default: the repository's data/)")
    args = parser.parse_args(argv)

    if args.command == "data":
        from .data.generate import main as generate_main

        return generate_main(["--out", args.out] if args.out else [])

    _quiet_lightning()
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
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = run_kfold(cfg, folds=folds, run_dir=args.run_dir, progress=not args.json and sys.stderr.isatty())
    _print_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
