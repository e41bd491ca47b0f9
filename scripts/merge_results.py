"""Merge every results table below the given dirs into one table (printed, and written with -o).

The reading rules are the report's (flashlight.report.build.gather): schema checks, one row per case (a case
measured again: the later row). For figures, a summary and a notebook: python -m flashlight.report DIR.
"""
import argparse
import sys

import pandas as pd

from flashlight.report.build import gather

ap = argparse.ArgumentParser()
ap.add_argument("dirs", nargs="+")
ap.add_argument("-o", "--out")
args = ap.parse_args()
inputs = gather(args.dirs)
for note in inputs.notes:
    print(f"merge_results: {note}", file=sys.stderr)
df = inputs.results
if df.empty:
    raise SystemExit(f"no results table below {args.dirs}")
if args.out:
    df.to_csv(args.out, index=False)
cols = ["variant", "backend", "Sq", "D", "Dv", "status", "ms", "tflops", "rel_err", "compile_s", "reason"]
with pd.option_context("display.width", 250, "display.max_colwidth", 70, "display.max_rows", 500):
    print(df[cols].to_string(index=False))
