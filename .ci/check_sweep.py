"""CI: every flashlight row of a sweep's results.csv files must be ok, wrong-free and error-free.

Usage: python .ci/check_sweep.py SWEEP_DIR. `not_fused` is allowed (the reason is printed); `error` and
`wrong` fail, as does a variant without a flashlight row (the job died before writing it)."""
import sys
from pathlib import Path

import pandas as pd

sweep = Path(sys.argv[1])
frames = [pd.read_csv(p) for p in sorted(sweep.glob("**/results.csv"))]
if not frames:
    sys.exit(f"check_sweep: no results.csv under {sweep}")
rows = pd.concat(frames)
fl = rows[rows["backend"] == "flashlight"]
bad = fl[fl["status"].isin(["error", "wrong"])]
for _, r in fl.iterrows():
    print(f"  {r['variant']:16s} {r['status']:10s} {r['reason'] if isinstance(r['reason'], str) else ''}")
variants = sorted(Path("configs/variant").glob("*.yaml"))
missing = sorted({v.stem for v in variants} - set(fl["variant"]))
if len(bad) or missing:
    sys.exit(f"check_sweep: {len(bad)} flashlight row(s) error/wrong; variants without a row: {missing}")
print(f"check_sweep: {len(fl)} flashlight rows, none error or wrong")
