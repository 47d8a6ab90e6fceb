#!/usr/bin/env python
"""Ship a sweep's finished cells as a CSV in ``data/sweeps/`` (with a JSON of where it came from).

A sweep that takes longer than a chapter may spend (``python -m prot_lib sweep NAME --out DIR``) is run
once; this script reads the cells it finished in ``DIR/cells/`` and writes their rows
(:func:`prot_lib.experiments.cells.rows_frame`, one per (cell, fold)) to ``OUT.csv``, and
``OUT.json``: the spec, how many of its cells were finished (a sweep stopped early ships what it has,
and says so), the prot_lib source fingerprint and torch version that ran them, and the command.

Cell keys include the source fingerprint (:func:`prot_lib.training.run_cache.run_key`), so run this
with the prot_lib that ran the sweep (the same commit), e.g. from that checkout::

    python scripts/ship_sweep.py ablation --from runs/sweeps/ablation --out data/sweeps/ishigami_ablation_seeds0-1

Raises SystemExit(2) when no cell of the spec is finished in ``DIR`` (wrong folder or other code).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from prot_lib.experiments import CellStore, load_spec, spec_cells  # noqa: E402
from prot_lib.experiments.cells import rows_frame  # noqa: E402
from prot_lib.training.run_cache import source_fingerprint  # noqa: E402
from prot_lib.utils.io import atomic_write_text  # noqa: E402

#: columns that describe where a cell ran, not what it found: left out of the shipped CSV
DROPPED = ("cell", "worker")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a shipped sweep spec (prot_lib/configs/sweeps/NAME.yaml) or a spec file")
    ap.add_argument("--from", dest="src", required=True, help="the sweep's --out folder (holds cells/)")
    ap.add_argument("--out", required=True, help="path without suffix: writes OUT.csv and OUT.json")
    ap.add_argument("--quick", action="store_true", help="the spec's quick variant")
    args = ap.parse_args(argv)

    spec = load_spec(args.name, quick=args.quick)
    cells = spec_cells(spec)
    store = CellStore(args.src)
    results = {c.key: r for c in cells if (r := store.load(c.key)) is not None}
    done = [c for c in cells if c.key in results]
    if not done:
        print(f"no finished cell of sweep {spec.name!r} in {args.src}/cells (other code, or another folder?)",
              file=sys.stderr)
        return 2
    rows = rows_frame(done, results)
    if spec.kind == "ablation":
        rows.insert(list(rows.columns).index("fix") + 1, "variant", rows["fix"])
        rows = rows.drop(columns=["fix"])
    rows = rows.drop(columns=[c for c in DROPPED if c in rows])
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".csv"), rows.to_csv(index=False))
    meta = {
        "spec": spec.model_dump(), "quick": args.quick,
        "cells_done": len(done), "cells_total": len(cells), "fold_runs": len(rows),
        "missing": [dict(c.labels, seed=c.config.training.seed, folds=list(c.folds)) for c in cells if c.key not in results],
        "source": source_fingerprint(), "torch": torch.__version__,
        "command": f"python -m prot_lib sweep {spec.name} --out {args.src}; "
                   f"python scripts/ship_sweep.py {args.name} --from {args.src} --out {args.out}",
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=1, default=str))
    print(f"{out.with_suffix('.csv')}: {len(rows)} fold runs of {len(done)}/{len(cells)} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
