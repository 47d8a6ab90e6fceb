#!/usr/bin/env python
"""The tables of docs/findings.md, generated from the JSON files in docs/findings/.

Every table of docs/findings.md sits between two markers::

    <!-- table: NAME -->
    | ... |
    <!-- /table -->

and :data:`TABLES` holds, per NAME, the function that writes it from the JSON (the raw records of
``scripts/seed_sweep.py``, ``scripts/compare_runs.py``, ``scripts/dyconex_nan_probe.py``). The prose
around the tables is written by hand; every number inside a table comes from a file.

    .venv/bin/python scripts/findings_tables.py            # rewrite the tables of docs/findings.md
    .venv/bin/python scripts/findings_tables.py --check    # exit 1 if a table differs from its JSON

The files predate :mod:`prot_lib.training.fate`: a fold "went NaN" there when its raw loss or a weight
became non-finite (their ``nonfinite_any``), which is what these tables count, as recorded.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ROOT / "docs" / "findings"
DOC = ROOT / "docs" / "findings.md"
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


# ------------------------------------------------------------------------------------------- helpers
def load(name: str, folder: Path) -> dict:
    return json.loads((folder / name).read_text())


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def num(v: Optional[float]) -> str:
    """2 decimals below 100, integers below 1e4, else one significant digit and its exponent (5.9e17)."""
    if v is None:
        return "-"
    if abs(v) < 100:
        return f"{v:.2f}"
    if abs(v) < 1e4:
        return f"{v:.0f}"
    mant, exp = f"{v:.1e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def sci(v: float) -> str:
    """A learning rate as the book writes it: 1e-4, 1.5e-2."""
    mant, exp = f"{v:.1e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def frac(k: int, n: int, bold: bool = False) -> str:
    text = f"{k}/{n}"
    return f"**{text}**" if bold else text


def steps_range(steps: List[int]) -> str:
    """"a-b (median m)" (the median from three values on), "a" for one value, "-" for none."""
    if not steps:
        return "-"
    lo, hi = min(steps), max(steps)
    if lo == hi:
        return f"{lo}"
    return f"{lo}-{hi}" + (f" (median {statistics.median(steps):g})" if len(steps) >= 3 else "")


def seed_span(seeds: List[int]) -> str:
    return f"{min(seeds)}-{max(seeds)}" if seeds == list(range(min(seeds), max(seeds) + 1)) else ", ".join(map(str, seeds))


def finite_rmse(jobs: List[dict]) -> List[float]:
    return [j["final_val_rmse"] for j in jobs if not j["nonfinite_any"] and j["final_val_rmse"] is not None]


def fix_row(label: str, jobs: List[dict], per_seed: List[dict]) -> List[str]:
    """One row of a fix table from seed-sweep records (``jobs``) and their ``per_seed`` summaries."""
    bad = [j for j in jobs if j["nonfinite_any"]]
    f0 = [j for j in jobs if j["fold"] == 0]
    loss_steps = sorted(j["first_nonfinite_loss_step"] for j in bad if j["first_nonfinite_loss_step"] is not None)
    param_steps = sorted(j["first_nonfinite_param_step"] for j in bad if j["first_nonfinite_param_step"] is not None)
    first = steps_range(loss_steps)
    if param_steps and param_steps != loss_steps:
        first = (f"{first}; params {steps_range(param_steps)}" if loss_steps else f"params {steps_range(param_steps)}")
    rmse = finite_rmse(jobs)
    fit = f"{num(statistics.median(rmse))} [{num(min(rmse))}, {num(max(rmse))}]" if rmse else "-"
    logged = frac(sum(bool(j["train_loss_all_finite"]) for j in bad), len(bad)) if bad else "-"
    patterns = [p["pattern"] for p in per_seed if p.get("pattern") is not None]
    return [label, frac(len(bad), len(jobs)), frac(sum(j["nonfinite_any"] for j in f0), len(f0)),
            frac(sum(patterns), len(patterns)), first, fit, logged]


def sweep_jobs(d: dict, seeds: Optional[Iterable[int]] = None) -> tuple:
    keep = set(seeds) if seeds is not None else None
    jobs = [j for j in d["jobs"] if keep is None or j["seed"] in keep]
    per_seed = [p for p in d["per_seed"] if keep is None or p["seed"] in keep]
    return jobs, per_seed


FIX_HEADER = ["fix", "folds NaN", "fold 0 NaN", "pattern", "first NaN step (loss; params where they differ)",
              "val RMSE finite folds, median [min, max]", "logged train_loss finite in NaN folds"]
FIX_ORDER = ["none", "clip", "dict-clip", "sanitize", "warmup", "layernorm", "normalize", "lower-lr", "all"]


def identical(compare: dict) -> bool:
    return all(compare["history_columns_bitwise_equal"].values()) and all(compare["final_params_bitwise_equal_per_fold"])


# -------------------------------------------------------------------------------------------- tables
def seed0(folder: Path) -> str:
    """Section 1: the shipped Ishigami reproduction, seed 0, per fold."""
    jobs, _ = sweep_jobs(load("ishigami_none_lr2e-2_seeds0-19.json", folder), [0])
    step = lambda s: "-" if s is None else f"**{s}**"  # noqa: E731
    return table(["fold", "first non-finite loss step", "first non-finite param step", "final val RMSE"],
                 [[j["fold"], step(j["first_nonfinite_loss_step"]), step(j["first_nonfinite_param_step"]),
                   num(j["final_val_rmse"])] for j in sorted(jobs, key=lambda j: j["fold"])])


def rates20(folder: Path) -> str:
    """Section 1: per-fold and pattern rates over seeds 0-19."""
    d = load("ishigami_none_lr2e-2_seeds0-19.json", folder)
    r = d["rates"]

    def rate(x: dict) -> str:
        return f"{x['k']}/{x['n']} = {x['rate']:.2f}"

    pattern_seeds = [p["seed"] for p in d["per_seed"] if p["pattern"]]
    loss_steps = r["first_nonfinite_loss_steps"]
    every = r["p_fold_nonfinite_loss"]["k"] == r["p_fold_nonfinite"]["k"]
    return table(["quantity", "value"], [
        ["per-fold divergence p", f"**{rate(r['p_fold_nonfinite'])}** (fold 0: {rate(r['p_fold0_nonfinite'])}; "
                                  f"folds 1-4: {rate(r['p_later_fold_nonfinite'])})"],
        ["pattern rate", f"**{rate(r['pattern_rate'])}** (seeds {', '.join(map(str, pattern_seeds))})"],
        ["seeds with any NaN fold", frac(r["any_nonfinite_rate"]["k"], r["any_nonfinite_rate"]["n"])],
        ["first NaN step", steps_range(loss_steps) + ("; every NaN fold has a non-finite loss" if every else "")],
        ["val RMSE of finite folds", f"median {num(r['median_val_rmse_finite_folds'])} "
                                     f"({r['n_finite_folds']} folds)"],
    ])


TUNING_FILES = ["ishigami_fix_lower-lr.json", "screen_ishigami_lr1e-2_seeds0-4.json",
                "screen_ishigami_lr1e-2_L5_seeds0-5.json", "screen_ishigami_lr1.5e-2_seeds0-5.json",
                "ishigami_none_lr2e-2_seeds0-19.json", "screen_ishigami_lr3e-2_seeds0-5.json"]


def tuning(folder: Path) -> str:
    """Section 1: the learning rates tried before settling on 2e-2."""
    rows = []
    for name in TUNING_FILES:
        d = load(name, folder)
        lr, layers = d["config"]["training"]["lr"], d["config"]["model"]["n_layers"]
        label = f"lr {sci(lr)}" + (f", {layers} layers" if layers != 4 else "")
        jobs, per_seed = sweep_jobs(d)
        bad = sum(j["nonfinite_any"] for j in jobs)
        rmse = finite_rmse(jobs)
        rows.append([f"**{label}**" if name.startswith("ishigami_none") else label, seed_span(d["args"]["seeds"]),
                     frac(bad, len(jobs)), frac(sum(p["pattern"] for p in per_seed), len(per_seed)),
                     f"{num(statistics.median(rmse))} ({len(rmse)} folds)" if rmse else "-", f"`{name}`"])
    return table(["setting", "seeds", "folds NaN", "pattern", "val RMSE finite folds (median)", "file"], rows)


def ishigami_fixes(folder: Path) -> str:
    """Section 2: every fix on the shipped Ishigami config, seeds 0-4, 5 folds."""
    rows = []
    for fix in FIX_ORDER:
        if fix == "none":
            jobs, per_seed = sweep_jobs(load("ishigami_none_lr2e-2_seeds0-19.json", folder), range(5))
        elif fix == "dict-clip":
            same = identical(load("ishigami_dictclip_vs_none_seed0.json", folder))
            rows.append(["dict-clip", "bit-identical to none (seed 0, 5 folds)" if same else "differs from none",
                         "", "", "", "", ""])
            continue
        else:
            jobs, per_seed = sweep_jobs(load(f"ishigami_fix_{fix}.json", folder))
        rows.append(fix_row(fix, jobs, per_seed))
        if fix == "clip":
            jobs, per_seed = sweep_jobs(load("ishigami_fix_clip_seeds0-9.json", folder))
            rows.append(fix_row("clip, seeds 0-9", jobs, per_seed))
    return table(FIX_HEADER, rows)


def dyconex_probe(folder: Path) -> str:
    """Section 3: the Dyconex data variants, one cause at a time."""
    d = load("dyconex_probe.json", folder)
    batch = d["config"]["training"]["batch_size"]
    rows = []
    for name, v in d["variants"].items():
        p = v["probe"]
        first = p["first_nonfinite"]
        if first is None:
            where = "none"
        else:
            where = f"{first['non_finite']} of `{first['module']}`"
            if first["non_finite"] == "input" and p["batch"]["rows_with_nan_x"]:
                where += f" (NaN inputs in {p['batch']['rows_with_nan_x']} chains)"
        nan_pred = p["pred"]["n_nan"] if p["pred"] else 0
        t = v.get("train", {})
        step = t.get("first_nonfinite_loss_step")
        trained = ("-" if not t else f"NaN at step {step}" if step is not None
                   else f"finite; val RMSE {num(t['final_val_rmse'])}")
        rows.append([f"`{name}`: {v['note']}", where, f"{nan_pred}/{batch}", trained])
    return table(["variant (what remains of the raw data)", "first non-finite tensor, first batch",
                  "NaN predictions", "training (fold 0)"], rows)


def dyconex_fixes(folder: Path) -> str:
    """Section 3: every fix on Dyconex, seeds 0-2, 5 folds."""
    rows = []
    for fix in FIX_ORDER:
        jobs, per_seed = sweep_jobs(load(f"dyconex_fix_{fix}.json", folder))
        rows.append(fix_row(fix, jobs, per_seed))
    return table(FIX_HEADER, rows)


def dyconex_normalize_lr(folder: Path) -> str:
    """Section 3: normalised Dyconex, seed 0, folds 0 and 1: mean val RMSE per (lr, epochs)."""
    def mean_rmse(d: dict) -> str:
        vals = [j["final_val_rmse"] for j in d["jobs"] if j["seed"] == 0 and j["fold"] in (0, 1)]
        return num(statistics.fmean(vals)) if vals and None not in vals else "-"

    files = [("dyconex_fix_normalize.json", " (config)"), ("dyconex_normalize_lr1e-4_e30.json", ""),
             ("dyconex_normalize_lr1e-3_e10.json", ""), ("dyconex_normalize_lr1e-3_e30.json", ""),
             ("dyconex_normalize_lr3e-3_e30.json", ""), ("dyconex_normalize_lr1e-2_e30.json", ""),
             ("dyconex_all_lr1e-3_e30.json", "")]
    rows = []
    for name, note in files:
        d = load(name, folder)
        t = d["config"]["training"]
        lr = f"all fixes, {sci(t['lr'])}" if d["args"]["fix"] == "all" else sci(t["lr"])
        rows.append([lr, f"{t['max_epochs']}{note}", mean_rmse(d)])
    return table(["lr", "epochs", "val RMSE"], rows)


#: every generated table of docs/findings.md, by the NAME of its marker
TABLES: Dict[str, Callable[[Path], str]] = {
    "seed0": seed0, "rates20": rates20, "tuning": tuning, "ishigami-fixes": ishigami_fixes,
    "dyconex-probe": dyconex_probe, "dyconex-fixes": dyconex_fixes, "dyconex-normalize-lr": dyconex_normalize_lr,
}


def render(text: str, folder: Path = FINDINGS) -> str:
    """``text`` with every marked table regenerated from the JSON in ``folder``.

    Raises:
        KeyError: a marker names no table of :data:`TABLES`.
    """
    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise KeyError(f"docs/findings.md marks a table {name!r} that {Path(__file__).name} does not generate")
        return m.group(1) + TABLES[name](folder) + m.group(4)
    return BLOCK.sub(fill, text)


def marked(text: str) -> List[str]:
    """The NAMEs of the marked tables in ``text``, in order."""
    return [m.group("name") for m in BLOCK.finditer(text)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 (with a diff) if docs/findings.md is stale")
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args(argv)
    text = args.doc.read_text()
    new = render(text)
    if args.check:
        if new != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), "committed",
                                                       "generated"))
            return 1
        return 0
    if new != text:
        args.doc.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
