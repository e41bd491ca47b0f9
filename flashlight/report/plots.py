"""The report's tables and figures, from a tidy results table (pandas + matplotlib only).

Every function here is copied verbatim into the generated notebook (see notebook.py), so the
notebook shows the code that drew each figure and re-runs without flashlight installed. Keep them
free of imports from the rest of the project.
"""
import ast
import math
import zlib

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd

# One measured case = everything but the backend and the measurements.
CASE = ["variant", "mode", "dtype", "device", "gpu", "B", "H", "Sq", "Sk", "D", "Dv", "params"]
NUMERIC = ["B", "H", "Sq", "Sk", "D", "Dv", "ms", "tflops", "rel_err", "peak_mem_mb", "compile_s"]
TEXT = ["variant", "backend", "mode", "dtype", "device", "gpu", "params", "status", "reason"]
# The same colour and marker for a backend in every figure; flashlight stands out.
BACKEND_STYLE = {
    "flashlight": {"color": "tab:red", "marker": "o"},
    "flex": {"color": "tab:blue", "marker": "s"},
    "sdpa": {"color": "tab:green", "marker": "^"},
    "compile": {"color": "tab:purple", "marker": "D"},
    "eager": {"color": "tab:gray", "marker": "v"},
}
MODE_NAME = {"fwd": "Forward", "fwdbwd": "Forward + backward"}


def tidy(df):
    """Types the runner's CSV loses: numbers as floats, absent text (CPU has no gpu name) as ''."""
    df = df.copy()
    for c in NUMERIC:
        if c not in df:
            df[c] = np.nan
        df[c] = pd.to_numeric(df[c], errors="coerce")
    for c in TEXT:
        if c not in df:
            df[c] = ""
        df[c] = df[c].map(lambda v: "" if pd.isna(v) else str(v))
    df["Sk"] = df["Sk"].fillna(df["Sq"])  # tables from before a column existed
    df["Dv"] = df["Dv"].fillna(df["D"])
    return df


def backend_style(backend):
    if backend in BACKEND_STYLE:
        return BACKEND_STYLE[backend]
    # a backend this file does not know: a tab10 colour that stays the same from run to run
    return {"color": plt.cm.tab10(zlib.crc32(backend.encode()) % 10), "marker": "x"}


def backends_in(df):
    """Known backends in a fixed order (flashlight first), then any others by name."""
    known = [b for b in BACKEND_STYLE if b in set(df["backend"])]
    return known + sorted(set(df["backend"]) - set(known))


def setup_name(row):
    """Where and how a case ran, for titles: 'bfloat16, NVIDIA H100 80GB HBM3' or 'float32, cpu'."""
    return f"{row['dtype']}, {row['gpu'] or row['device']}"


def seq_label(n):
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def params_label(params):
    """"{'window': 1024}" -> 'window=1024' (the runner writes the repr of a dict)."""
    try:
        d = ast.literal_eval(params) if params else {}
        return ", ".join(f"{k}={v}" for k, v in d.items())
    except (ValueError, SyntaxError):
        return params


def case_labels(frame):
    """A short name per row: the variant, plus whatever shape fields vary within `frame`."""
    def label(r):
        parts = [r["variant"]]
        if frame["Sq"].nunique() > 1:
            parts.append(f"S{seq_label(r['Sq'])}" + (f"/{seq_label(r['Sk'])}" if r["Sk"] != r["Sq"] else ""))
        if frame["D"].nunique() > 1 or frame["Dv"].nunique() > 1:
            parts.append(f"D{r['D']:.0f}" + (f"/{r['Dv']:.0f}" if r["Dv"] != r["D"] else ""))
        if frame["B"].nunique() > 1 or frame["H"].nunique() > 1:
            parts.append(f"B{r['B']:.0f}H{r['H']:.0f}")
        if frame.groupby("variant")["params"].nunique().max() > 1:
            parts.append(params_label(r["params"]))
        return " ".join(p for p in parts if p)
    return frame.apply(label, axis=1)


def sort_cases(df):
    """Cases grouped by variant (in the order the variants first appear), then by shape."""
    order = {v: i for i, v in enumerate(dict.fromkeys(df["variant"]))}
    return df.sort_values(["variant", "Sq", "Sk", "D", "Dv", "B", "H"], kind="stable",
                          key=lambda c: c.map(order) if c.name == "variant" else c)


def log_axis(axis):
    """Log scale with plain labels (0.1, 0.2, 0.5, 1, 2, …) instead of powers of ten."""
    axis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(mticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(mticker.NullFormatter())


def ok_rows(df):
    """Speed counts only where the result was right."""
    return df[df["status"] == "ok"]


def speedups(df, baseline="flex"):
    """Per case and backend: baseline time / backend time (>1: faster than the baseline); ok rows only."""
    ok = ok_rows(df)
    base = ok[ok["backend"] == baseline][CASE + ["ms"]].rename(columns={"ms": "baseline_ms"})
    other = ok[ok["backend"] != baseline]
    sp = other.merge(base, on=CASE, how="inner")
    sp["speedup"] = sp["baseline_ms"] / sp["ms"]
    return sp[CASE + ["backend", "ms", "baseline_ms", "speedup"]]


def geomean_table(sp):
    """Geometric mean speedup per mode, setup and backend, with the number of cases behind it."""
    if sp.empty:
        return pd.DataFrame(columns=["mode", "dtype", "gpu", "device", "backend", "cases", "geomean", "min", "max"])
    g = sp.groupby(["mode", "dtype", "gpu", "device", "backend"], sort=False)["speedup"]
    t = g.agg(cases="count", geomean=lambda s: float(np.exp(np.log(s).mean())), min="min", max="max")
    return t.reset_index()


def _grid(n, title):
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(5.0, 3.7 * ncols + 0.6), 2.9 * nrows + 1.3),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontweight="bold")
    return fig, list(axes.flat[:n])


def _legend(fig, axes):
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=len(handles), frameon=False)


def plot_vs_seqlen(df, column, ylabel, logy=False, what="TFLOP/s"):
    """One figure per mode, head dim and setup; one panel per variant; x = sequence length (log 2),
    one line per backend (the FlashAttention papers' layout). Several rows at one point: the median."""
    data = df[df[column].notna() & np.isfinite(df[column])]
    figs = {}
    for (mode, D, dtype, gpu, device), g in data.groupby(["mode", "D", "dtype", "gpu", "device"], sort=False):
        panels = g.groupby(["variant", "Dv", "params"], sort=False)
        several_params = g.groupby("variant")["params"].nunique()
        title = f"{MODE_NAME.get(mode, mode)} {what}, head dim {D:.0f}\n{setup_name(g.iloc[0])}"
        fig, axes = _grid(panels.ngroups, title)
        for ax, ((variant, Dv, params), p) in zip(axes, panels):
            for i, backend in enumerate(backends_in(g)):  # markers shrink so equal values stay visible
                line = p[p["backend"] == backend].groupby("Sq")[column].median()
                if len(line):
                    ax.plot(line.index, line.values, label=backend, markersize=9 - 1.5 * i, **backend_style(backend))
            name = variant + (f"  (Dv {Dv:.0f})" if Dv != D else "")
            if several_params[variant] > 1:
                name += "\n" + params_label(params)
            ax.set_title(name, fontsize=10)
            seqs = sorted(g["Sq"].unique())
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqs, [seq_label(s) for s in seqs])
            ax.minorticks_off()
            ax.set_xlim(min(seqs) / 1.4, max(seqs) * 1.4)
            if logy:
                ax.set_yscale("log")
                log_axis(ax.yaxis)
            else:
                ax.set_ylim(bottom=0, top=max(1e-12, p[column].max()) * 1.15)
            ax.grid(alpha=0.3)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(ylabel)
        _legend(fig, axes)
        figs[f"{column}_{mode}_d{D:.0f}_{dtype}_{(gpu or device).replace(' ', '_')}"] = fig
    return figs


def plot_tflops(df):
    return plot_vs_seqlen(ok_rows(df), "tflops", "TFLOP/s")


def plot_memory(df):
    return plot_vs_seqlen(ok_rows(df), "peak_mem_mb", "peak memory (MiB)", what="peak GPU memory")


def _bars(df, value, ylabel, title, logy):
    """Grouped bars: one group per df['case'] (x), one bar per backend; pandas does the grouping."""
    table = df.pivot_table(index="case", columns="backend", values=value, aggfunc="median", sort=False)
    table = table[backends_in(df)]
    width = min(18.0, max(7.0, 0.18 * table.size + 0.35 * len(table) + 2.0))
    fig, ax = plt.subplots(figsize=(width, 4.8), layout="constrained")
    table.plot.bar(ax=ax, width=0.8, logy=logy, color=[backend_style(b)["color"] for b in table.columns])
    if logy:
        log_axis(ax.yaxis)
    ax.set_title(title, fontweight="bold")
    ax.set_xlabel("")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="x", labelrotation=35)
    plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    ax.legend(title="backend", fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig, ax, table


def plot_speedup(df, baseline="flex"):
    """Speedup over FlexAttention per case, log scale, plus the geometric mean of each backend."""
    sp = sort_cases(speedups(df, baseline))
    figs = {}
    for (mode, dtype, gpu, device), g in sp.groupby(["mode", "dtype", "gpu", "device"], sort=False):
        gm = geomean_table(g)
        g = pd.concat([g.assign(case=case_labels(g)), gm.assign(case="geo. mean", speedup=gm["geomean"])])
        title = f"{MODE_NAME.get(mode, mode)}: speedup over {baseline} (higher is better) — {setup_name(g.iloc[0])}"
        fig, ax, table = _bars(g, "speedup", f"{baseline} time / backend time", title, logy=True)
        ax.axhline(1.0, color="black", lw=1)
        last = len(table) - 1  # the geo. mean group: print its values
        for bars, backend in zip(ax.containers, table.columns):
            bar = bars[last]
            if np.isfinite(bar.get_height()):
                n = int(gm.set_index("backend").loc[backend, "cases"])
                ax.annotate(f"{bar.get_height():.2f}× ({n})", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, rotation=90, xytext=(0, 2),
                            textcoords="offset points")
        ax.axvspan(last - 0.5, last + 0.5, color="gold", alpha=0.15, lw=0)
        low, high = ax.get_ylim()
        ax.set_ylim(top=high * (high / low) ** 0.4)  # room above the bars for the printed means (log axis)
        figs[f"speedup_{mode}_{dtype}_{(gpu or device).replace(' ', '_')}"] = fig
    return figs


def plot_compile_time(df):
    """Seconds of the first call (compilation + one run) of the compiled backends."""
    data = sort_cases(ok_rows(df))
    data = data[data["compile_s"].notna()]
    figs = {}
    for (mode, dtype, gpu, device), g in data.groupby(["mode", "dtype", "gpu", "device"], sort=False):
        title = f"{MODE_NAME.get(mode, mode)}: compile time (first call) — {setup_name(g.iloc[0])}"
        fig, _, _ = _bars(g.assign(case=case_labels(g)), "compile_s", "seconds", title, logy=False)
        figs[f"compile_{mode}_{dtype}_{(gpu or device).replace(' ', '_')}"] = fig
    return figs


def plot_correctness(df, tolerances):
    """‖out − ref‖/‖ref‖ per case and backend (log scale), with the runner's tolerance as a line.
    tolerances: {(dtype, device): tol}. Wrong rows are drawn too: that is what this plot is for."""
    data = sort_cases(df[df["rel_err"].notna() & np.isfinite(df["rel_err"])])
    figs = {}
    for (mode, dtype, gpu, device), g in data.groupby(["mode", "dtype", "gpu", "device"], sort=False):
        g = g.assign(case=case_labels(g))
        cases = list(dict.fromkeys(g["case"]))
        backends = backends_in(g)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(cases) + 2.5), 4.2), layout="constrained")
        for i, backend in enumerate(backends):
            b = g[g["backend"] == backend]
            x = b["case"].map(cases.index) + (i - (len(backends) - 1) / 2) * 0.15
            ax.scatter(x, b["rel_err"].clip(lower=1e-16), label=backend, s=28, **backend_style(backend))
        tol = tolerances.get((dtype, device))
        if tol:
            ax.axhline(tol, color="black", ls="--", lw=1, label=f"tolerance {tol:g}")
        ax.set_yscale("log")
        log_axis(ax.yaxis)
        ax.set_xticks(range(len(cases)), cases, rotation=35, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.7, len(cases) - 0.3)
        ax.set_ylabel("relative error vs float64 reference")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title(f"{MODE_NAME.get(mode, mode)}: correctness (lower is better) — {setup_name(g.iloc[0])}",
                     fontweight="bold")
        figs[f"rel_err_{mode}_{dtype}_{(gpu or device).replace(' ', '_')}"] = fig
    return figs


def plot_tuning(trials, title):
    """An Optuna study's history (study.trials_dataframe()): each trial's value and the best so far."""
    trials = trials.sort_values("number")
    done = trials[(trials["state"] == "COMPLETE") & trials["value"].notna()]
    fig, ax = plt.subplots(figsize=(7.5, 3.8), layout="constrained")
    ax.scatter(done["number"], done["value"], s=18, color="tab:blue", label="complete trial")
    ax.step(done["number"], done["value"].cummin(), where="post", color="tab:red", label="best so far")
    failed = trials[~trials.index.isin(done.index)]
    ax.margins(y=0.15)  # room at the bottom for the trials without a value
    for state, f in failed.groupby("state"):  # no value to plot: a mark along the bottom of the axes
        ax.scatter(f["number"], np.full(len(f), 0.04), transform=ax.get_xaxis_transform(), marker="x",
                   color={"FAIL": "black", "PRUNED": "tab:orange"}.get(state, "tab:gray"),
                   label=f"{state.lower()} ({len(f)})")
    ax.set_xlim(trials["number"].min() - 0.5, trials["number"].max() + 0.5)
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("value (time: lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
