"""Merge every results.csv below the given dirs into one table (printed, and written with -o)."""
import argparse
from pathlib import Path

import pandas as pd

ap = argparse.ArgumentParser()
ap.add_argument("dirs", nargs="+")
ap.add_argument("-o", "--out")
args = ap.parse_args()
frames = [pd.read_csv(p) for d in args.dirs for p in sorted(Path(d).rglob("results.csv"))]
if not frames:
    raise SystemExit(f"no results.csv below {args.dirs}")
df = pd.concat(frames, ignore_index=True)
if args.out:
    df.to_csv(args.out, index=False)
cols = [c for c in ("variant", "backend", "Sq", "D", "Dv", "status", "ms", "tflops", "rel_err", "compile_s", "reason")
        if c in df.columns]
with pd.option_context("display.width", 250, "display.max_colwidth", 70, "display.max_rows", 500):
    print(df[cols].to_string(index=False))
