"""One table of a sweep: every results.csv below the given dirs (each Slurm job writes its own), one row
per case (variant, backend, mode, dtype, device, gpu, shape, params); a case measured again
(resume=false, or another launch) keeps its last row.

    python scripts/cluster/merge_sweep.py sweeps/s1 [more dirs] -o sweeps/s1/all_results.csv
"""
import argparse
import sys

import pandas as pd

from flashlight.harness.run import CASE_KEY, merge_results, read_results

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("dirs", nargs="+", help="sweep or run dirs to search for results.csv")
ap.add_argument("-o", "--out", help="write the merged table to this CSV")
args = ap.parse_args()

every = read_results(*args.dirs)
if every.empty:
    sys.exit(f"merge_sweep: no results.csv with rows below {', '.join(args.dirs)}")
df = merge_results(*args.dirs)
if args.out:
    df.to_csv(args.out, index=False)
cols = ["variant", "backend", "mode", "dtype", "Sq", "D", "status", "ms", "tflops", "rel_err"]
with pd.option_context("display.width", 200, "display.max_rows", 1000):
    print(df[cols].to_string(index=False))
print(f"{len(df)} cases from {len(every)} rows ({len(every) - len(df)} measured again; last kept)"
      + (f" -> {args.out}" if args.out else ""))
print("case key:", ", ".join(CASE_KEY))
