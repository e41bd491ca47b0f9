"""The same sweep through hydra/launcher=gpus on 1 GPU and on N, and the ratio of their wall times (benchmark).

    python scripts/gpu_scaling.py --gpus 2 --out outputs/gpu_scaling
    python scripts/gpu_scaling.py --gpus 2 --order 2,1 --variants causal,alibi --mode fwdbwd

Each sweep starts from empty Triton, Inductor and flashlight caches (no kernel compiled, no job durations
recorded) and in a sweep dir of its own. Before the first, the modules every job imports are imported once,
untimed, so that neither sweep pays for reading them from disk alone (the first command on a machine does).
Prints per sweep: the wall time, the launcher's span (first job start to last job end, from gpu_jobs.csv) and
the rest (Hydra's start, the sweep's set-up), then the ratio N-GPU / 1-GPU and whether both measured the same
cases. Writes each sweep's results (merged), its gpu_jobs.csv and walls.csv under --out. `--order 1` or
`--order N` runs that one sweep alone (where one command may not last as long as both take).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from flashlight.harness.run import merge_results

PAPER_VARIANTS = "vanilla,causal,alibi,softcap,sliding_window,prefix_lm,document_mask,diff_attn,gqa,t5_bias,sinks"


def sweep(n_gpus: int, args, work: Path) -> dict:
    caches = work / f"caches_{n_gpus}"
    env = {**os.environ, "TRITON_CACHE_DIR": str(caches / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
           "FLASHLIGHT_CACHE_DIR": str(caches / "flashlight")}
    sweep_dir = work / f"sweep_{n_gpus}"
    cmd = [sys.executable, "-m", "flashlight.run", "-m", "hydra/launcher=gpus", f"hydra.launcher.gpus={n_gpus}",
           f"hydra.sweep.dir={sweep_dir}", f"variant={args.variants}", f"shape={args.shape}", f"mode={args.mode}",
           f"backends=[{args.backends}]", "report=false", *args.overrides]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (args.out / f"sweep_{n_gpus}.log").write_text(p.stdout + p.stderr)
    jobs = pd.read_csv(sweep_dir / "gpu_jobs.csv")
    span = float(jobs["end"].max() - jobs["start"].min())
    shutil.copy(sweep_dir / "gpu_jobs.csv", args.out / f"gpu_jobs_{n_gpus}gpu.csv")
    merged = args.out / f"results_{n_gpus}gpu.csv"
    merge_results(sweep_dir).to_csv(merged, index=False)
    return {"gpus": n_gpus, "rc": p.returncode, "wall_s": round(wall, 1), "launcher_span_s": round(span, 1),
            "rest_s": round(wall - span, 1), "jobs": len(jobs), "job_seconds_sum": round(float(jobs["seconds"].sum()), 1),
            "results": merged}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=2, help="the sweep on this many GPUs against the same on 1")
    ap.add_argument("--order", default="1,N", help="which sweep runs first: 1,N or N,1; 1 or N: that sweep alone")
    ap.add_argument("--variants", default=PAPER_VARIANTS)
    ap.add_argument("--shape", default="paper")
    ap.add_argument("--mode", default="fwd")
    ap.add_argument("--backends", default="flashlight,flex,sdpa")
    ap.add_argument("--out", type=Path, default=Path("outputs/gpu_scaling"))
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for both sweeps")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # what every job and the launcher import, once, untimed: both sweeps then find them in the page cache
    subprocess.run([sys.executable, "-c", "import torch, triton, hydra, submitit, flashlight.run"], check=True)
    order = [1 if x.strip() == "1" else args.gpus for x in args.order.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_scaling_") as work:
        for n in order:
            rows.append(sweep(n, args, Path(work)))
            print({k: v for k, v in rows[-1].items() if k != "results"}, flush=True)
    walls = pd.DataFrame(rows)
    walls.drop(columns="results").to_csv(args.out / "walls.csv", index=False)
    if len(order) == 1:   # one sweep (a machine's time limit may not fit both): compare walls.csv files by hand
        return rows[0]["rc"]
    one, many = (next(r for r in rows if r["gpus"] == n) for n in (1, args.gpus))
    keys = ["variant", "backend", "mode", "dtype", "Sq", "D", "status"]
    same = {tuple(r) for r in pd.read_csv(one["results"])[keys].astype(str).values} == \
        {tuple(r) for r in pd.read_csv(many["results"])[keys].astype(str).values}
    print(f"{args.gpus} GPUs / 1 GPU wall: {many['wall_s']} / {one['wall_s']} s = {many['wall_s'] / one['wall_s']:.3f}; "
          f"same cases and statuses: {same}")
    return 0 if one["rc"] == 0 and many["rc"] == 0 and same else 1


if __name__ == "__main__":
    sys.exit(main())
