"""Regenerate every shipped data file: ``python -m prot_lib.data.generate [--out DIR]``.

Writes, into DIR (default: the repository's ``data/`` folder, or ``$PROT_LIB_DATA``):

    ishigami.csv                  1000 samples, seed 0
    dyconex_standin_steps.csv     600 synthetic chains x 18 tokens, seed 0
    dyconex_standin_targets.csv   600 synthetic targets, seed 0
    dyconex_long_standin.sha256   SHA-256 of the long stand-ins (generated at load time, not shipped)

The output is byte-identical from run to run on one machine. Across machines and numpy versions
a float cell computed with sin() may differ in its last bits (numpy 2.4 and 2.3 differ by up to 8 ulps
on 8 of the 1000 Ishigami targets); the float32 tensors the models train on stay identical.
tests/test_data.py checks both against the shipped files. ``data/README.md`` (the data card) is written by hand, not here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .dyconex import STEPS_FILE, STEPS_SCHEMA, TARGETS_FILE, TARGETS_SCHEMA, dyconex_tables
from .dyconex_long import write_checksums
from .ishigami import ISHIGAMI_FILE, ISHIGAMI_SCHEMA, ishigami_table
from .tables import data_dir, write_table

__all__ = ["write_all", "main"]

ISHIGAMI_N, DYCONEX_CHAINS, SEED = 1000, 600, 0


def write_all(out: str | Path) -> list[Path]:
    """Write the data files into ``out`` (created if needed); returns their paths."""
    out = Path(out)
    steps, targets = dyconex_tables(DYCONEX_CHAINS, SEED)
    return [
        write_table(ishigami_table(ISHIGAMI_N, SEED), out / ISHIGAMI_FILE, ISHIGAMI_SCHEMA),
        write_table(steps, out / STEPS_FILE, STEPS_SCHEMA),
        write_table(targets, out / TARGETS_FILE, TARGETS_SCHEMA),
        write_checksums(out),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prot_lib.data.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the repository's data/)")
    args = parser.parse_args(argv)
    for path in write_all(data_dir(args.out)):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
