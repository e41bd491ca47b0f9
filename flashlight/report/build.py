"""Reports: every results table below some dirs -> figures, a summary (markdown + HTML), a notebook.

    python -m flashlight.report RUN_OR_SWEEP_DIR [more dirs or CSV files] [-o OUT] [--notebook PATH]

Gathers results.csv files (and any CSV with the runner's columns) below the given paths, checks their
schema, and writes OUT/report.md, report.html, all_results.csv, figures/*.png|svg and report.ipynb
(executed, outputs embedded). Tuning records (Optuna trial tables, pictures) in folders or files whose
name contains "tun" or "optuna" are included when present. Problems with the input are reported and
the rest of the report is still written; the exit status is non-zero only when there is nothing at
all to report. The runner calls this at the end of a run or multirun with report=true.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from flashlight.report import plots as rp  # noqa: E402
from flashlight.results_schema import COLUMNS, tolerance  # noqa: E402

# What the figures and the summary cannot do without; the other columns may be absent (older tables).
REQUIRED = ["variant", "backend", "mode", "status", "Sq", "D", "ms", "tflops"]
TRIAL_COLUMNS = {"number", "value", "state"}  # Optuna's study.trials_dataframe()
TUNING_WORDS = ("tun", "optuna")
MARKER = ".flashlight-report"  # marks a report folder, so a later report does not read it as input
TABLE = "all_results.csv"


class NothingToReport(Exception):
    pass


@dataclasses.dataclass
class Inputs:
    results: pd.DataFrame  # every row used, tidy, with a 'source' column
    sources: pd.DataFrame  # one row per results table read
    tuning: list  # (root, path): trial tables and other tuning CSVs
    pictures: list  # (root, path): tuning pictures
    notes: list  # what was wrong or missing, for the user


def _show(path: Path) -> str:
    """A path as the user would type it: relative to the current dir where possible."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _is_tuning(rel: Path) -> bool:
    return any(w in part.lower() for part in rel.parts for w in TUNING_WORDS)


def _skip(path: Path, root: Path, out: Path | None) -> bool:
    """Hidden folders (.hydra), report folders (ours or any earlier one) are not inputs."""
    path, root = path.resolve(), root.resolve()
    for d in [path.parent, *path.parent.parents]:
        if d == out:
            return True
        if d == root:
            return False
        if (d / MARKER).exists() or d.name.startswith("."):
            return True
    return False


def find_inputs(paths, out: Path | None, notes: list):
    """(root, file) pairs of CSV tables and tuning pictures below the given paths, in order."""
    csvs, pictures = [], []
    for p in map(Path, paths):
        if not p.exists():
            notes.append(f"{p}: no such file or directory")
        elif p.is_file():
            if p.suffix == ".csv":
                csvs.append((p.parent, p))
            else:
                notes.append(f"{p}: not a CSV table; skipped")
        else:
            # oldest first, as the runner merges: a case measured again later wins (see _drop_repeats)
            files = sorted((f for f in p.rglob("*") if f.is_file() and not _skip(f, p, out and out.resolve())),
                           key=lambda f: (f.stat().st_mtime, f))
            found = [(p, f) for f in files if f.suffix == ".csv"]
            pics = [(p, f) for f in files if f.suffix in (".png", ".svg") and _is_tuning(f.relative_to(p))]
            if not found and not pics:
                notes.append(f"{p}: no results table below it (an empty or unfinished run? "
                             f"the runner writes results.csv into its run dir)")
            csvs += found
            pictures += pics
    return csvs, pictures


def gather(paths, out: Path | None = None) -> Inputs:
    """Every results table (and tuning record) below paths, checked and merged; `out` is not read."""
    notes: list = []
    csvs, pictures = find_inputs(paths, out, notes)
    frames, tuning, layouts = [], [], {}
    for root, f in csvs:
        torn: list = []
        try:  # a run still writing may leave a torn last line: skip it, say so
            t = pd.read_csv(f, engine="python", on_bad_lines=lambda line: torn.append(line))
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
            notes.append(f"{_show(f)}: not readable as a CSV table ({type(e).__name__}: {str(e)[:120]}); skipped")
            continue
        if torn:
            notes.append(f"{_show(f)}: {len(torn)} malformed line(s) skipped (a run still writing?)")
        cols = set(t.columns)
        if {"variant", "backend", "status"} <= cols:
            missing = [c for c in REQUIRED if c not in cols]
            if missing:
                notes.append(f"{_show(f)}: a results table without the column(s) {', '.join(missing)} that the "
                             f"report needs; skipped (the runner writes: {', '.join(COLUMNS)})")
            elif t.empty:
                notes.append(f"{_show(f)}: a header without rows (did the run stop before its first case?)")
            else:
                # 'source' (the run dir of each row) is what scripts/merge_results.py adds: expected
                layouts[f] = ([c for c in COLUMNS if c not in cols],
                              [c for c in t.columns if c not in COLUMNS and c != "source"])
                frames.append(t.assign(source=_show(f)))
        elif TRIAL_COLUMNS <= cols or _is_tuning(f.relative_to(root)):
            tuning.append((root, f))
        else:
            notes.append(f"{_show(f)}: not a results table (no variant/backend/status columns); skipped")

    odd = {f: lay for f, lay in layouts.items() if lay != ([], [])}
    if odd:
        n = len({(tuple(a), tuple(b)) for a, b in layouts.values()})
        what = f"mixed schema versions ({n} column layouts)" if n > 1 else "another schema version than the runner's"
        detail = "; ".join(
            f"{_show(f)}" + (f" lacks {', '.join(miss)} (left empty)" if miss else "")
            + (f" has {', '.join(extra)} (not used)" if extra else "") for f, (miss, extra) in odd.items())
        notes.append(f"{what}: {detail}")

    if frames:
        results = rp.tidy(pd.concat(frames, ignore_index=True))
        results = _drop_repeats(results, notes)
        _note_failing_backends(results, notes)
    else:
        results = rp.tidy(pd.DataFrame(columns=COLUMNS + ["source"]))
    sources = (results.groupby("source", sort=False)
               .agg(rows_used=("backend", "size"), gpu=("gpu", _joined), device=("device", _joined),
                    torch=("torch", _joined), triton=("triton", _joined)).reset_index())
    return Inputs(results, sources, tuning, pictures, notes)


def _joined(values) -> str:
    return ", ".join(sorted({str(v) for v in values if str(v) not in ("", "nan")}))


def _drop_repeats(df: pd.DataFrame, notes: list) -> pd.DataFrame:
    """The same case measured twice: the later row is used (a later path argument; below one dir, the
    file written later; within a file, the later line)."""
    key = rp.CASE + ["backend"]
    repeated = df.duplicated(key, keep="last")
    if repeated.any():
        kept = df[~repeated]
        pairs = df[repeated].merge(kept[key + ["source"]], on=key, suffixes=("", "_kept"))
        for (old, new), n in pairs.groupby(["source", "source_kept"], sort=False).size().items():
            if old == new:
                notes.append(f"{old}: {n} row(s) repeat an earlier case of the same file; the last row is used")
            else:
                notes.append(f"{n} case(s) of {old} were measured again in {new} (given later): "
                             f"the later rows are used")
    return df[~repeated].reset_index(drop=True)


def _note_failing_backends(df: pd.DataFrame, notes: list):
    for backend, g in df.groupby("backend", sort=False):
        if not (g["status"] == "ok").any():
            counts = ", ".join(f"{n} {s}" for s, n in g["status"].value_counts().items())
            notes.append(f"backend {backend}: no row with status ok ({counts}); it is absent from the speed "
                         f"figures, its reasons are under 'Rows not ok'")


def tolerances(df: pd.DataFrame) -> dict:
    """The runner's pass/fail tolerance for each (dtype, device) present: {(dtype, device): tol}."""
    import torch

    tols = {}
    for dtype, device in df[["dtype", "device"]].drop_duplicates().itertuples(index=False):
        if isinstance(getattr(torch, dtype, None), torch.dtype) and device in ("cpu", "cuda"):
            tols[(dtype, device)] = tolerance(getattr(torch, dtype), torch.device(device))
    return tols


# ------------------------------------------------------------------------------------------ writing
def save(fig, stem: Path):
    fig.savefig(stem.with_suffix(".png"), dpi=150)
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "flashlight"}):  # text stays text; stable ids
        fig.savefig(stem.with_suffix(".svg"), metadata={"Date": None})
    plt.close(fig)


def _md_table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True) if len(df) else "(none)"


def _shape(r) -> str:
    s = f"B{r['B']:.0f} H{r['H']:.0f} S{r['Sq']:.0f}" + (f"×{r['Sk']:.0f}" if r["Sk"] != r["Sq"] else "")
    return s + f" D{r['D']:.0f}" + (f"/{r['Dv']:.0f}" if r["Dv"] != r["D"] else "")


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    """One line per case, one column per backend: TFLOP/s where ok, else the status."""
    df = rp.sort_cases(df).assign(
        setup=lambda d: d["dtype"] + " " + d["gpu"].where(d["gpu"] != "", d["device"]),
        shape=lambda d: d.apply(_shape, axis=1), params=lambda d: d["params"].map(rp.params_label),
        cell=lambda d: d.apply(lambda r: f"{r['tflops']:.3g}" if r["status"] == "ok" else r["status"], axis=1))
    index = ["variant", "params", "mode", "setup", "shape"]
    t = df.pivot_table(index=index, columns="backend", values="cell", aggfunc="last", sort=False)
    return t.reindex(columns=rp.backends_in(df)).fillna("").reset_index()


def write_markdown(inp: Inputs, figures: list, tuning_md: list, command: str, notebook_link: str) -> str:
    df = inp.results
    gm = rp.geomean_table(rp.speedups(df))
    gm = gm.assign(setup=gm["dtype"] + " " + gm["gpu"].where(gm["gpu"] != "", gm["device"]))
    gm = gm[["mode", "setup", "backend", "cases", "geomean", "min", "max"]].rename(columns={"geomean": "geo. mean"})
    for c in ("geo. mean", "min", "max"):
        gm[c] = gm[c].map(lambda x: f"{x:.2f}×")
    failed = df[df["status"] != "ok"].assign(reason=lambda d: d["reason"].str.slice(0, 200))
    failed = rp.sort_cases(failed)[["variant", "backend", "mode", "Sq", "D", "status", "reason", "source"]]
    failed["Sq"], failed["D"] = failed["Sq"].map("{:.0f}".format), failed["D"].map("{:.0f}".format)

    md = ["# Flashlight report", "",
          f"Regenerate: `{command}`" if command else "", "",
          f"{len(df)} rows ({(df['status'] == 'ok').sum()} ok) from {len(inp.sources)} results table(s). "
          f"Speed figures use ok rows only. All rows, merged: [{TABLE}]({TABLE}). "
          + (f"Notebook: [{Path(notebook_link).name}]({notebook_link})." if notebook_link else ""), "",
          _md_table(inp.sources), ""]
    if inp.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in inp.notes] + [""]
    md += ["## Speedup over FlexAttention", "",
           "flex time / backend time per case (ok rows of both), geometric mean over the cases; >1 is faster.", "",
           _md_table(gm) if len(gm) else "(no case has ok rows of both flex and another backend)", "",
           "## Results (TFLOP/s where ok, otherwise the status)", "", _md_table(results_table(df)) if len(df) else
           "(no results rows)", ""]
    md += _baseline_notes(df)
    md += ["## Figures", ""]
    for heading, stems, why in figures:
        md += [f"### {heading}", ""]
        md += [f"![{s}](figures/{s}.png)  \n[SVG](figures/{s}.svg)\n" for s in stems] if stems else [f"({why})", ""]
    md += ["## Rows not ok", "", _md_table(failed), ""]
    if tuning_md:
        md += ["## Tuning", ""] + tuning_md
    return "\n".join(md) + "\n"


def _baseline_notes(df: pd.DataFrame) -> list:
    """What the baselines' ok rows did beyond the attention call: SDPA given a materialised dense mask or bias
    (its reason), and the preparation timed apart from ms (prep_ms, per_batch_ms; runner columns since issue 15)."""
    ok = df[(df["status"] == "ok") & (df["backend"] == "sdpa") & df["reason"].notna() & (df["reason"] != "")]
    md = []
    if len(ok):
        notes = ok.drop_duplicates("variant")[["variant", "reason"]].sort_values("variant")
        md += ["## How the baselines express each variant", "",
               "How SDPA's ok rows express the variant (a materialised dense mask or bias is what SDPA can do, not a "
               "fused kernel of the variant):", "", _md_table(notes), ""]
    cols = [c for c in ("prep_ms", "per_batch_ms") if c in df.columns and df[c].notna().any()]
    if cols:
        prep = df[(df["status"] == "ok") & df[cols].notna().any(axis=1)]
        prep = rp.sort_cases(prep)[["variant", "backend", "mode", "Sq", "ms", *cols]]
        for c in ("ms", *cols):
            prep[c] = prep[c].map(lambda x: "" if pd.isna(x) else f"{x:.3g}")
        prep["Sq"] = prep["Sq"].map("{:.0f}".format)
        md += ["## Preparation timed apart from the call", "",
               "prep_ms: one-off work before the calls (FlexAttention's create_block_mask, SDPA's materialised "
               "mask/bias; flashlight's data-mask classification as per_batch_ms − ms), not in ms. per_batch_ms: "
               "preparation + call when the mask inputs (document ids) are new every call, as in training.", "",
               _md_table(prep), ""]
    return md


HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>Flashlight report</title>
<style>body{{font-family:sans-serif;max-width:1500px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;font-size:90%}}td,th{{border:1px solid #ccc;padding:2px 6px}}
th{{background:#f3f3f3}}img{{max-width:100%}}code{{background:#f3f3f3}}</style></head>
<body>{body}</body></html>
"""


def write_report(paths, out, notebook=None, command: str = "", make_notebook: bool = True) -> Path:
    """Write the report of every results table below `paths` into `out`; returns out/report.md."""
    import markdown

    out = Path(out)
    inp = gather(paths, out)
    if inp.results.empty and not inp.tuning and not inp.pictures:
        raise NothingToReport("nothing to report: no results table (results.csv, or a CSV with the runner's "
                              "columns) and no tuning record below " + ", ".join(map(str, paths))
                              + "".join(f"\n  - {n}" for n in inp.notes))
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by flashlight.report; later reports do not read this folder\n")
    inp.results.to_csv(out / TABLE, index=False)

    tols = tolerances(inp.results)
    with plt.style.context("default"):  # the runner's process may have changed the style (Optuna's plots do)
        figures = _draw(inp.results, tols, out)
        tuning_md = _write_tuning(inp, out)

    nb_path = Path(notebook) if notebook else out / "report.ipynb"
    if make_notebook:
        from flashlight.report import notebook as report_notebook

        inp.notes += report_notebook.write(nb_path, out / TABLE, out / "tuning", tols, command)
    for n in inp.notes:
        print(f"flashlight.report: {n}", file=sys.stderr)
    text = write_markdown(inp, figures, tuning_md, command, _relative(nb_path, out) if make_notebook else "")
    (out / "report.md").write_text(text)
    body = markdown.markdown(text, extensions=["tables"])
    (out / "report.html").write_text(HTML.format(body=body))
    return out / "report.md"


def _draw(df: pd.DataFrame, tols: dict, out: Path) -> list:
    """Every figure into out/figures; per section: (heading, file stems, why there are none)."""
    figures = []
    for heading, figs, why in [
        ("TFLOP/s vs sequence length", rp.plot_tflops(df), "no row has status ok"),
        ("Speedup over FlexAttention", rp.plot_speedup(df),
         "no case has ok rows of both flex and another backend: run with flex among the backends"),
        ("Peak memory vs sequence length", rp.plot_memory(df), "no peak memory recorded (CPU runs record none)"),
        ("Compile time", rp.plot_compile_time(df), "no compile time recorded: no compiled backend has an ok row"),
        ("Correctness", rp.plot_correctness(df, tols), "no finite relative error recorded"),
    ]:
        for stem, fig in figs.items():
            save(fig, out / "figures" / stem)
        figures.append((heading, list(figs), why))
    return figures


def _relative(target: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def _write_tuning(inp: Inputs, out: Path) -> list:
    """Copy tuning records into out/tuning, draw each Optuna history; markdown lines for the report."""
    if not inp.tuning and not inp.pictures:
        return []
    folder = out / "tuning"
    folder.mkdir(exist_ok=True)
    md = []
    for root, f in inp.tuning + inp.pictures:
        name = "__".join(f.relative_to(root).parts)
        shutil.copyfile(f, folder / name)
        if f.suffix == ".csv":
            try:
                t = pd.read_csv(f)
            except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
                inp.notes.append(f"{_show(f)}: tuning table not readable ({type(e).__name__}); copied only")
                continue
            md += [f"### {_show(f)}", ""]
            if TRIAL_COLUMNS <= set(t.columns):
                stem = "tuning_" + Path(name).stem
                save(rp.plot_tuning(t, _show(f)), out / "figures" / stem)
                best = t[t["state"] == "COMPLETE"]["value"].min()
                md += [f"{len(t)} trials, {(t['state'] == 'COMPLETE').sum()} complete, best value {best:.4g}.", "",
                       f"![{stem}](figures/{stem}.png)", ""]
            else:
                md += [_md_table(t.head(30).astype(str)), ""]
        else:
            md += [f"### {_show(f)}", "", f"![{name}](tuning/{name})", ""]
    return md


# ------------------------------------------------------------------------------------------ runner hooks
def report_after_run(run_dir: Path) -> Path | None:
    """The runner's report=true: one report of everything below run_dir, in run_dir/report."""
    try:
        path = write_report([run_dir], Path(run_dir) / "report",
                            command=f"python -m flashlight.report {shlex.quote(_show(Path(run_dir)))}")
    except NothingToReport as e:
        print(f"flashlight.report: {e}", file=sys.stderr)
        return None
    print(f"report: {_show(path)}")
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m flashlight.report", description=__doc__.split("\n\n")[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                    help="run or sweep dirs (every results table below them) or CSV files; when one case "
                         "appears twice, the table given later (below a dir: written later) wins")
    ap.add_argument("-o", "--out", help="report folder (default: DIR/report for a single dir, else ./report)")
    ap.add_argument("--notebook", help="notebook path (default: OUT/report.ipynb)")
    ap.add_argument("--no-notebook", action="store_true", help="skip the notebook (and its execution)")
    args = ap.parse_args(argv)
    out = args.out or (Path(args.paths[0]) / "report" if len(args.paths) == 1 and Path(args.paths[0]).is_dir()
                       else Path("report"))
    command = "python -m flashlight.report " + " ".join(map(shlex.quote, argv))
    try:
        path = write_report(args.paths, out, args.notebook, command, make_notebook=not args.no_notebook)
    except NothingToReport as e:
        print(f"flashlight.report: {e}", file=sys.stderr)
        return 1
    print(f"report: {_show(path)}")
    return 0

