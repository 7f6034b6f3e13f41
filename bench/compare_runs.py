"""Are two study runs' tables the same numbers? Reproducibility check for `make demo`.

    python bench/compare_runs.py CHECKOUT_A/results/demo CHECKOUT_B/results/demo

Every table of the results schema is read from both results folders; timestamps, run ids and
the checkouts' own folder names are dropped or normalised; rows are sorted on every remaining
column and compared. Prints, per table, the row counts and either "identical" or the largest
absolute and relative difference of each numeric column that differs (and the text columns that
differ). Exit status 1 when any table differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

VOLATILE = {"created_at", "run_id", "flow_run_id", "started_at", "finished_at", "duration_s", "wall_s", "seconds",
            "elapsed_s", "tokens_per_s", "path", "prefect_flow_run_id"}


def _normalised(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """`df` without volatile columns, with the checkout's folder replaced by `<root>`."""
    df = df.drop(columns=[c for c in df.columns if c in VOLATILE or c.endswith("_at")])
    if "step" in df.columns and pd.api.types.is_string_dtype(df["step"]):  # `runs`: Prefect task-run names,
        df = df.drop(columns=["step"])  # some with a random suffix (`prepare-pair-5db`)
    prefixes = sorted({str(root.resolve()), str(root.resolve().parent.parent), str(root.resolve().parent)}, key=len, reverse=True)
    for col in df.columns:
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            df[col] = df[col].map(lambda v: _strip(v, prefixes))
    keys = [c for c in df.columns if df[c].map(lambda v: isinstance(v, (str, int, float, bool, np.number)) or v is None).all()]
    return df.sort_values(keys).reset_index(drop=True) if keys and len(df) else df


def _strip(value, prefixes: list[str]):
    if isinstance(value, str):
        for p in prefixes:
            value = value.replace(p, "<root>")
    return value


def compare(a: Path, b: Path) -> bool:
    from sae_transfer.storage.tables import SCHEMAS, read_table

    same = True
    for name in SCHEMAS:
        da, db = (_normalised(read_table(r, name).to_pandas(), r) for r in (a, b))
        if len(da) != len(db):
            print(f"{name}: {len(da)} vs {len(db)} rows")
            same = False
            continue
        diffs = []
        for col in da.columns:
            x, y = da[col], db[col]
            if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
                xv, yv = x.to_numpy(dtype=float), y.to_numpy(dtype=float)
                equal = (xv == yv) | (np.isnan(xv) & np.isnan(yv))
                if not equal.all():
                    gap = np.nanmax(np.abs(xv - yv))
                    rel = np.nanmax(np.abs(xv - yv) / np.maximum(np.abs(xv), 1e-30))
                    diffs.append(f"{col} (max |diff| {gap:.3g}, rel {rel:.3g}, {int((~equal).sum())} rows)")
            elif not all(str(u) == str(v) for u, v in zip(x, y)):
                diffs.append(f"{col} (text)")
        print(f"{name}: {len(da)} rows, " + ("identical" if not diffs else "differs: " + "; ".join(diffs)))
        same &= not diffs
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    return 0 if compare(args.a, args.b) else 1


if __name__ == "__main__":
    sys.exit(main())
