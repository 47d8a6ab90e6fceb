"""Command line: ``python -m prot_lib reproduce|run|autopsy|data|sweep``.

- ``python -m prot_lib reproduce ishigami|dyconex|dyconex_long|dyconex_long_ci [--fix FIX] [--json]``:
  run a shipped reproduction (with one fix, e.g. ``--fix postnorm``, the write-up's final one, or all)
  and print a per-fold table (or JSON: a list of per-fold summaries).
- ``python -m prot_lib run CONFIG.yaml [--json]``: run any config file.
- ``reproduce``/``run`` ``--on-nonfinite continue|stop|skip|rollback`` overrides ``training.on_nonfinite``;
  when training stops on a non-finite step, the autopsy report is printed (``--json``: as a dict); when
  ``skip``/``rollback`` dropped steps, each fold's first dropped step, its autopsy verdict and its repro
  bundle are printed (``--json``: ``first_dropped_step``, ``autopsy_verdict``, ``bundle`` per fold).
- ``python -m prot_lib autopsy BUNDLE.pt [--json]``: replay a repro bundle and print its autopsy report.
- ``python -m prot_lib data regenerate [--out DIR]``: rewrite the shipped data files.
- ``python -m prot_lib sweep NAME [--engine local|dask] [--scheduler ADDRESS] [--quick] [--out DIR]``: run
  one of the book's sweeps (``prot_lib/configs/sweeps/NAME.yaml``) through the sweep engine
  (:func:`prot_lib.experiments.run_sweep`) and print its tables; an interrupted sweep resumes from DIR.


The library is imported inside the functions, not at the top: ``--help`` and ``data`` do not pay for
importing torch and Lightning (seconds). The CLI is the top layer, so this dodges no import cycle.
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


#: exit statuses (also in ``--help`` and the README)
EXIT_OK = 0
#: the autopsy's replay of a bundle stayed finite (``autopsy`` only)
EXIT_NOT_REPRODUCED = 1
#: bad input: invalid config or arguments, unreadable bundle (argparse's own usage errors are 2 as well)
EXIT_BAD_INPUT = 2
#: training stopped by ``training.on_nonfinite`` (stop, or too many skips/rollbacks in a row)
EXIT_NONFINITE = 3
#: the run finished but every fold ended dead: non-finite weights or validation metrics at the end
EXIT_ALL_DEAD = 4

EXIT_CODES = f"""exit status:
  {EXIT_OK}  success (reproduce/run: at least one fold ended usable; autopsy: the non-finite value reappeared)
  {EXIT_NOT_REPRODUCED}  autopsy: the replay of the bundle stayed finite
  {EXIT_BAD_INPUT}  bad input: invalid config file, arguments or bundle
  {EXIT_NONFINITE}  training stopped at a non-finite step (training.on_nonfinite: stop, or too many
     skips/rollbacks in a row); the autopsy and the bundle path are printed
  {EXIT_ALL_DEAD}  every fold ended dead (non-finite weights or validation metrics at the end);
     the table (or JSON) is printed first"""

_SUMMARY_WIDE = ("autopsy_verdict", "bundle")


def _print_result(result, as_json: bool) -> None:
    records = result.to_records()
    if as_json:
        print(json.dumps(records, indent=2))
        return
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 40):
        print(f"run: {result.config.name}  (logs: {result.run_dir})")
        print(result.summary.drop(columns=list(_SUMMARY_WIDE)).to_string(index=False))
    dropped = [r for r in records if r.get("first_dropped_step") is not None]
    if dropped:
        print("\nsteps dropped by training.on_nonfinite:")
        for r in dropped:
            n = f"{r['n_skipped']} skipped" if r["n_skipped"] else f"{r['n_rollbacks']} rolled back"
            print(f"  fold {r['fold']}: {n}; first at step {r['first_dropped_step']}: "
                  f"{r['autopsy_verdict'] or 'no autopsy'}")
            if r["bundle"]:
                print(f"    bundle: {r['bundle']}  (replay: python -m prot_lib autopsy {r['bundle']})")
    if result.warnings:
        print("\nLightning warnings:")
        for w in dict.fromkeys(result.warnings):
            print("  " + w)


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
    except (FileNotFoundError, ValueError, ConfigError, ImportError, AttributeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(report.summary(), indent=2) if as_json else str(report))
    return EXIT_OK if report.reproduced else EXIT_NOT_REPRODUCED


def _add_sweep_parser(sub, config_dir) -> None:
    names = sorted(p.stem for p in (config_dir / "sweeps").glob("*.yaml"))
    sw = sub.add_parser(
        "sweep", help="run one of the book's sweeps on every core or on a Dask cluster",
        description="Run a sweep spec (prot_lib/configs/sweeps/NAME.yaml) through the sweep engine. Each "
        "cell's result is written to DIR/cells/ as it finishes, so a sweep run again with the same DIR "
        "skips the cells already there; the rows and tables go to DIR too.")
    sw.add_argument("name", metavar="NAME", help=f"a shipped sweep ({', '.join(names)}) or a spec YAML file")
    sw.add_argument("--engine", choices=["local", "dask"], default="local",
                    help="local: worker processes on this machine (joblib/loky), one torch thread each; "
                    "dask: a Dask distributed cluster (default: local)")
    sw.add_argument("--scheduler", metavar="ADDRESS",
                    help="with --engine dask: a running scheduler, e.g. tcp://10.0.0.5:8786 (started by "
                    "dask-jobqueue, dask-kubernetes, dask ssh or by hand); default: a LocalCluster")
    sw.add_argument("--quick", action="store_true", help="the spec's quick variant (about a minute on 2 cores)")
    sw.add_argument("--out", metavar="DIR", help="results folder (default: runs/sweeps/NAME[-quick])")
    sw.add_argument("--jobs", type=int, metavar="N",
                    help="worker processes of the local engine or the LocalCluster (default: every core)")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sweep(args) -> int:
    from .experiments import run_sweep
    from .training.config import ConfigError

    try:
        result = run_sweep(args.name, quick=args.quick, engine=args.engine, scheduler=args.scheduler,
                           n_jobs=args.jobs, out=args.out, progress=False if args.no_progress else None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.report())
    print(f"\nresults: {result.out}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .training.config import CONFIG_DIR, FIXES, ConfigError, reproduction_datasets

    parser = argparse.ArgumentParser(prog="python -m prot_lib", description=__doc__.split("\n")[0],
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub_kw = dict(epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    rep = sub.add_parser("reproduce", help="run a shipped NaN reproduction, optionally with a fix", **sub_kw)
    rep.add_argument("dataset", choices=reproduction_datasets())
    rep.add_argument("--fix", default="none", choices=FIXES,
                     help="one fix on top of the reproduction (postnorm: the write-up's final LayerNorm fix)")
    rep.add_argument("--folds", type=int, nargs="*", help="only these folds (default: all)")
    rep.add_argument("--seed", type=int, help="override training.seed")
    rep.add_argument("--json", action="store_true", help="print per-fold summaries as JSON")
    rep.add_argument("--run-dir", help="where CSV logs go (default runs/<name>/<time>-<random>)")
    policies = ["continue", "stop", "skip", "rollback"]
    rep.add_argument("--on-nonfinite", choices=policies, help="override training.on_nonfinite")
    run = sub.add_parser("run", help="run any config file", **sub_kw)
    run.add_argument("config")
    run.add_argument("--json", action="store_true")
    run.add_argument("--run-dir")
    run.add_argument("--on-nonfinite", choices=policies, help="override training.on_nonfinite")
    aut = sub.add_parser("autopsy", help="replay a non-finite step's repro bundle and print its autopsy", **sub_kw)
    aut.add_argument("bundle", help="a nonfinite_step<N>.pt file from <run_dir>/fold<k>/")
    aut.add_argument("--json", action="store_true")
    data = sub.add_parser("data", help="dataset utilities")
    data.add_argument("action", choices=["regenerate"])
    data.add_argument("--out", help="output folder (default: the repository's data/)")
    _add_sweep_parser(sub, CONFIG_DIR)
    args = parser.parse_args(argv)
    if args.command == "sweep" and args.scheduler and args.engine != "dask":
        parser.error("--scheduler needs --engine dask")

    if args.command == "data":
        from .data.generate import main as generate_main

        return generate_main(["--out", args.out] if args.out else [])

    _quiet_lightning()
    if args.command == "sweep":
        return _sweep(args)
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
        return EXIT_BAD_INPUT
    try:
        result = run_kfold(cfg, folds=folds, run_dir=args.run_dir, progress=not args.json and sys.stderr.isatty())
    except NonFiniteTrainingError as err:
        _print_nonfinite(err, args.json)
        return EXIT_NONFINITE
    _print_result(result, args.json)
    if result.all_dead:
        print(f"error: every fold ended dead (non-finite weights or validation metrics): "
              f"folds {result.dead_folds}", file=sys.stderr)
        return EXIT_ALL_DEAD
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
