"""What tuning buys, and how Optuna's search compares with Triton's own autotune (GPU benchmark).

    python scripts/tune_vs_autotune.py --out DIR            # a GPU: causal, alibi, diff_attn, document_mask,
                                                            # B4 H32 S4096 D64 bf16, 12 configs per tuner
    python scripts/tune_vs_autotune.py --out DIR --smoke    # CPU, Triton interpreter, tiny shape: the logic only

Per variant, the kernel of its fused region gets:
  - default:  the generator's default tile config (runtime.default_config);
  - optuna:   flashlight.tune on a fresh in-memory study, N trials (the default enqueued first);
  - autotune: triton.autotune over N configs of the same legal space (the default first, then a seeded
              random sample), i.e. the same budget of configs, each benchmarked once.
Both tuners time the same call (flashlight's own launch of the region) with the same do_bench settings;
the kernels they compile are shared (Triton's cache), so their wall times are not comparable, their
quality per trial is. Then the three picks are timed side by side (3 interleaved rounds of do_bench
with --final-rep-ms, median) and each one's output is compared with the default's. Writes under --out: results.csv (final times), trials.csv (every
trial of both tuners in order, with the best so far), times.png, best_so_far.png,
optuna/<kernel>-*.png (Optuna's history and importances); prints a table last. Stops starting new
variants after --budget-s seconds (the rows say which were skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--out", required=True, help="output folder")
ap.add_argument("--variants", default="causal,alibi,diff_attn,document_mask")
ap.add_argument("--shape", default="4,32,4096,64", help="B,H,S,D (Dv: the variant's default)")
ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
ap.add_argument("--n", type=int, default=12, help="configs per tuner: Optuna trials = autotune configs")
ap.add_argument("--rep-ms", type=int, default=20, help="do_bench rep per trial (both tuners)")
ap.add_argument("--final-rep-ms", type=int, default=100, help="do_bench rep of the side-by-side timing")
ap.add_argument("--budget-s", type=float, default=240, help="start no new variant after this many seconds")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--smoke", action="store_true", help="CPU interpreter, B1 H2 S64 D16 float32, n=4")
args = ap.parse_args()
if args.smoke:
    args.shape, args.dtype, args.n = "1,2,64,16", "float32", min(args.n, 4)
if args.smoke or shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import KernelInterface  # noqa: E402

from flashlight import tune  # noqa: E402
from flashlight.harness import variant_registry as registry  # noqa: E402
from flashlight.compiler.runtime import CompiledRegion, default_config, interpreting  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
GPU = torch.cuda.is_available() and not interpreting()
DEVICE = torch.device("cuda" if GPU else "cpu")
T0 = time.perf_counter()


def bench(fn, rep_ms, quantiles=None):
    """Median ms (or the given quantiles): do_bench on a GPU, a few timed calls in the interpreter."""
    if GPU:
        return triton.testing.do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, quantiles=quantiles,
                                       return_mode="median")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(times)] * len(quantiles) if quantiles else statistics.median(times)


class RegionLaunch(KernelInterface):
    """What triton.autotune drives: flashlight's whole launch of the region with the config it tries
    (as Triton's own Heuristics wraps a kernel: .fn, .arg_names, .run), so both tuners time one call."""

    arg_names = ["inputs"]

    def __init__(self, ks):
        self.ks = ks
        self.fn = _region_launch  # a plain function: the autotuner looks through .fn for a name
        self.regions = {}

    def run(self, inputs, *, grid=None, warmup=False, BLOCK_M, BLOCK_N, num_warps, num_stages, **_):
        cfg = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "num_warps": num_warps, "num_stages": num_stages}
        key = tuple(cfg.values())
        if key not in self.regions:
            self.regions[key] = CompiledRegion(self.ks, cfg)
        return self.regions[key](inputs)


def _region_launch(inputs):
    raise NotImplementedError("a name for triton.autotune; RegionLaunch.run launches")


def run_autotune(ks, inputs, configs):
    """triton.autotune over `configs` (in order); its pick and each config's median ms, in order."""
    tuner = triton.autotune(
        [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                       num_stages=c["num_stages"]) for c in configs],
        key=[], do_bench=lambda fn, quantiles: bench(fn, args.rep_ms, quantiles))(RegionLaunch(ks))
    tuner[(1,)](inputs)  # benchmarks every config, then launches the best
    timings = [tuner.configs_timings[c][0] for c in tuner.configs]
    best = tuner.best_config
    return {"BLOCK_M": best.kwargs["BLOCK_M"], "BLOCK_N": best.kwargs["BLOCK_N"], "num_warps": best.num_warps,
            "num_stages": best.num_stages}, timings


def best_so_far(values):
    out, best = [], float("inf")
    for v in values:
        best = min(best, v)
        out.append(best)
    return out


def compare_variant(name, rows, trials, out):
    v = registry.get(name)
    B, H, S, D = map(int, args.shape.split(","))
    shape = v.shape(B, H, S, S, D, None)
    dtype = getattr(torch, args.dtype)
    inputs = v.make_inputs(shape, dtype, DEVICE, seed=args.seed)
    regions = tune.fused_regions(v.bind(shape), **inputs)
    if not regions:
        rows.append({"variant": name, "method": "-", "status": "not fused"})
        return
    flops = v.flops(shape)
    for region, region_inputs in regions:
        ks = region.ks
        base = {"variant": name, "kernel": ks.name}
        default = tune.complete_config(default_config(ks, DEVICE.type))
        legal = tune.legal_configs(ks, DEVICE)
        others = [c for c in legal if c != default]
        sample = [default] + random.Random(args.seed).sample(others, min(args.n - 1, len(others)))

        # Optuna: a fresh study (in memory), the same budget
        t = time.perf_counter()
        remaining = max(30.0, args.budget_s - (time.perf_counter() - T0))
        res = tune.tune_region(ks, region_inputs, n_trials=args.n, storage=optuna.storages.InMemoryStorage(),
                               rep_ms=args.rep_ms, seed=args.seed, timeout=remaining)
        optuna_wall = time.perf_counter() - t
        values = [tr.value if tr.state.name == "COMPLETE" else float("inf") for tr in res.study.trials]
        for i, (tr, b) in enumerate(zip(res.study.trials, best_so_far(values))):
            trials.append({**base, "method": "optuna", "trial": i, "config": json.dumps(tr.user_attrs.get("config")),
                           "ms": values[i], "best_so_far_ms": b, "failure": tr.user_attrs.get("failure", "")})
        tune.save_report(res, out / "optuna")
        distinct = len({json.dumps(tr.user_attrs.get("config"), sort_keys=True) for tr in res.study.trials})

        # triton.autotune over the same number of configs from the same space
        t = time.perf_counter()
        try:
            at_best, at_times = run_autotune(ks, tune.fresh_inputs(region_inputs), sample)
        except Exception as e:  # one tuner failing must not lose the other's numbers
            at_best, at_times = None, []
            print(f"{name}: autotune failed: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc()
        autotune_wall = time.perf_counter() - t
        for i, (c, ms, b) in enumerate(zip(sample, at_times, best_so_far(at_times))):
            trials.append({**base, "method": "autotune", "trial": i, "config": json.dumps(c), "ms": ms,
                           "best_so_far_ms": b, "failure": "" if ms < float("inf") else "out of resources"})

        # the three picks, timed side by side on the same inputs, checked against the default's output
        fresh = tune.fresh_inputs(region_inputs, seed=1)
        ref = CompiledRegion(ks, default)(fresh)
        picks = [("default", default, None), ("optuna", res.best_config, optuna_wall),
                 ("autotune", at_best, autotune_wall)]
        launches, errors = {}, {}
        for method, cfg, _ in picks:
            if cfg is not None:
                launches[method] = CompiledRegion(ks, cfg)
                errors[method] = tune.rel_err(launches[method](fresh), ref)
        # interleaved rounds, median per pick: drift (clocks, heat) hits every pick alike
        times = {m: [] for m in launches}
        for _ in range(3):
            for m, launch in launches.items():
                times[m].append(bench(lambda: launch(fresh), args.final_rep_ms))
        for method, cfg, wall in picks:
            # Optuna's sampler may propose a config again (measured once, reused): count the distinct ones
            row = {**base, "method": method, "config": json.dumps(cfg), "tune_wall_s": wall,
                   "distinct_configs": {"default": 1, "optuna": distinct, "autotune": len(at_times)}[method]}
            if cfg is None:
                rows.append({**row, "status": "failed"})
                continue
            ms, err = statistics.median(times[method]), errors[method]
            rows.append({**row, "status": "ok" if err <= tune.tolerance(ks.out_dtype, DEVICE) else "wrong",
                         "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "rel_err_vs_default": err})
        d = next(r["ms"] for r in rows if r.get("kernel") == ks.name and r["method"] == "default")
        for r in rows:
            if r.get("kernel") == ks.name and r.get("ms"):
                r["speedup_vs_default"] = d / r["ms"]


def plot(results, trials, out):
    ok = results[results["status"].isin(["ok", "wrong"])]
    if not ok.empty:
        table = ok.pivot_table(index="variant", columns="method", values="ms", sort=False)
        table = table[[m for m in ("default", "optuna", "autotune") if m in table.columns]]
        ax = table.plot.bar(rot=0, figsize=(8, 4), color=["tab:gray", "tab:red", "tab:blue"][:len(table.columns)])
        ax.set_ylabel("ms (median, lower is better)")
        ax.set_title(f"Tile configs: default vs Optuna vs triton.autotune ({args.n} configs each)\n"
                     f"shape B,H,S,D={args.shape} {args.dtype} on {tune.device_name(DEVICE)}", fontsize=9)
        ax.figure.savefig(out / "times.png", dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
    if not trials.empty:
        names = list(dict.fromkeys(trials["variant"]))
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
        for ax, name in zip(axes[0], names):
            t = trials[trials["variant"] == name]
            for method, color in (("optuna", "tab:red"), ("autotune", "tab:blue")):
                m = t[t["method"] == method]
                ax.step(m["trial"] + 1, m["best_so_far_ms"], where="post", color=color, label=method)
            d = results[(results["variant"] == name) & (results["method"] == "default")]
            if not d.empty and "ms" in d:
                ax.axhline(d["ms"].iloc[0], color="tab:gray", ls="--", label="default (final timing)")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("configs tried")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel("best ms so far")
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Best time found per budget of configs (autotune in its given order)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "best_so_far.png", dpi=120, bbox_inches="tight")
        plt.close(fig)


def main():
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, trials = [], []
    for name in args.variants.split(","):
        if time.perf_counter() - T0 > args.budget_s:
            rows.append({"variant": name, "method": "-", "status": f"skipped: --budget-s {args.budget_s:g} spent"})
            continue
        try:
            compare_variant(name, rows, trials, out)
        except Exception as e:  # a variant that fails is a row; the others still run
            rows.append({"variant": name, "method": "-", "status": f"error: {type(e).__name__}: {e}"[:300]})
            traceback.print_exc()
        # write as we go: nothing measured is lost if a later variant dies
        pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
        pd.DataFrame(trials).to_csv(out / "trials.csv", index=False)
    results, trials = pd.DataFrame(rows), pd.DataFrame(trials)
    for col in ("ms", "tflops", "speedup_vs_default", "rel_err_vs_default", "tune_wall_s"):
        if col not in results:
            results[col] = float("nan")
    plot(results, trials, out)
    print(f"\n{tune.device_name(DEVICE)}, torch {torch.__version__}, triton {triton.__version__}, "
          f"shape B,H,S,D={args.shape} {args.dtype}, {args.n} configs per tuner, {time.perf_counter() - T0:.0f} s")
    cols = ["variant", "method", "status", "ms", "tflops", "speedup_vs_default", "rel_err_vs_default",
            "distinct_configs", "tune_wall_s", "config"]
    shown = results.reindex(columns=cols)
    shown["status"] = shown["status"].astype(str).str.slice(0, 60)
    with pd.option_context("display.width", 250, "display.max_colwidth", 80):
        print(shown.to_string(index=False, float_format=lambda x: f"{x:.4g}"))


if __name__ == "__main__":
    main()
