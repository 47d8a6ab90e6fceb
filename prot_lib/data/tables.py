"""Reading and writing the shipped CSV files, with a schema check that names the culprit.

Every data file of the project is a flat CSV with a fixed set of columns. A column has
one of four kinds:

    "int"     integer (e.g. chain_id, step); never empty
    "float"   number; never empty, never +-inf
    "float?"  number or missing: an empty cell (as written) or "nan"; never +-inf
    "str"     non-empty text

:func:`read_table` raises :class:`~prot_lib.data.base.DataError` on the first problem,
naming the file, the 1-based line number as an editor shows it (line 1 = header) and
the column. :func:`write_table` writes floats as Python's shortest round-trip ``repr``
and missing values as empty cells, with "\\n" line ends, so regenerating a file gives
the same bytes.

Where the files live: :func:`data_dir` = the ``data_dir`` argument, else the
environment variable ``PROT_LIB_DATA``, else ``<repo>/data`` (next to the ``prot_lib``
package, as in a source checkout).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping

import pandas as pd

from .base import DataError

__all__ = ["data_dir", "read_table", "write_table", "regenerate_hint", "DATA_DIR_ENV"]

DATA_DIR_ENV = "PROT_LIB_DATA"
_INT = re.compile(r"[+-]?[0-9]+")
_MISSING = {"", "nan", "NaN", "NAN"}


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder holding the data files: ``path``, else ``$PROT_LIB_DATA``, else
    ``Path(prot_lib.__file__).parents[1] / "data"``."""
    if path is not None:
        return Path(path)
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data"  # <repo>/prot_lib/data/tables.py -> <repo>/data


def regenerate_hint(folder: Path) -> str:
    return f"regenerate it with `python -m prot_lib.data.generate --out {folder}`"


def _cell_error(path: Path, row: int, column: str, problem: str) -> DataError:
    # row is the DataFrame position; +2 = 1-based and skip the header line.
    return DataError(f"{path}: line {row + 2}, column '{column}': {problem}")


def read_table(path: str | os.PathLike, schema: Mapping[str, str]) -> pd.DataFrame:
    """Read a CSV and check it against ``schema`` ({column: kind}, see module docstring).

    Returns a DataFrame with exactly the schema's columns, in the schema's order:
    int64 for "int", float64 (NaN = missing) for "float"/"float?", str for "str".

    Raises DataError:
        * the file does not exist (names the path and the regeneration command);
        * the file cannot be parsed as CSV, or is empty;
        * a column is missing, unexpected, or duplicated (names the file and columns);
        * a cell is not a number / not an integer / empty where not allowed / +-inf
          (names the file, the line and the column).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; {regenerate_hint(path.parent)}")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from err

    header = list(raw.columns)
    missing = [c for c in schema if c not in header]
    extra = [c for c in header if c not in schema]
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing column(s) " + ", ".join(repr(c) for c in missing))
        if extra:
            parts.append("unexpected column(s) " + ", ".join(repr(c) for c in extra))
        raise DataError(f"{path}: " + "; ".join(parts) + f" (expected columns: {', '.join(schema)})")

    out = {}
    for column, kind in schema.items():
        cells = raw[column].tolist()
        if kind == "int":
            for row, cell in enumerate(cells):
                if not _INT.fullmatch(cell.strip()):
                    raise _cell_error(path, row, column, f"expected an integer, got {cell!r}")
            out[column] = pd.Series([int(c) for c in cells], dtype="int64")
        elif kind in ("float", "float?"):
            values = []
            for row, cell in enumerate(cells):
                text = cell.strip()
                if text in _MISSING:
                    if kind == "float":
                        raise _cell_error(path, row, column, "missing value, but this column may not have missing values")
                    values.append(math.nan)
                    continue
                try:
                    value = float(text)
                except ValueError:
                    raise _cell_error(path, row, column, f"expected a number, got {cell!r}") from None
                if math.isinf(value) or math.isnan(value):
                    raise _cell_error(path, row, column, f"non-finite value {cell!r} is not allowed")
                values.append(value)
            out[column] = pd.Series(values, dtype="float64")
        elif kind == "str":
            for row, cell in enumerate(cells):
                if not cell.strip():
                    raise _cell_error(path, row, column, "empty text")
            out[column] = pd.Series(cells, dtype=object)
        else:  # pragma: no cover - a programming error in a schema
            raise ValueError(f"unknown column kind {kind!r} for column {column!r}")
    return pd.DataFrame(out)


def _format_float(value: float) -> str:
    return "" if math.isnan(value) else repr(float(value))


def write_table(frame: pd.DataFrame, path: str | os.PathLike, schema: Mapping[str, str]) -> Path:
    """Write ``frame``'s schema columns to ``path`` as CSV, byte-reproducibly.

    Floats: shortest round-trip ``repr`` (reading gives back the identical float64);
    NaN: empty cell; ints: plain digits; line ends: "\\n". Creates parent folders.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = {}
    for column, kind in schema.items():
        if kind in ("float", "float?"):
            text[column] = [_format_float(v) for v in frame[column].to_numpy(dtype="float64")]
        elif kind == "int":
            text[column] = [str(int(v)) for v in frame[column]]
        else:
            text[column] = [str(v) for v in frame[column]]
    pd.DataFrame(text).to_csv(path, index=False, lineterminator="\n")
    return path
