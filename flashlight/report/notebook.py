"""The report's notebook: reloads the report's table and redraws every figure with the code in view.

The cells are the source of flashlight/report/plots.py, split by definition (nbformat), so the notebook
re-runs in Jupyter without flashlight installed and never drifts from the figures of the report. It is
executed headless (nbclient) so that the saved notebook carries its outputs.
"""
from __future__ import annotations

import ast
import inspect
import logging
import os
from pathlib import Path

from flashlight.report import plots as report_plots

# (heading, text, definitions shown in the cell, code that draws); the rest of report_plots goes first.
SECTIONS = [
    ("TFLOP/s vs sequence length", "One panel per variant, one line per backend; ok rows only.",
     ["plot_vs_seqlen", "plot_tflops"], "figs = plot_tflops(df)"),
    ("Speedup over FlexAttention", "flex time / backend time per case; the last group is the geometric mean.",
     ["speedups", "geomean_table", "plot_speedup"], "figs = plot_speedup(df)\ndisplay(geomean_table(speedups(df)))"),
    ("Peak memory vs sequence length", "Peak GPU memory of the timed calls (none on CPU).",
     ["plot_memory"], "figs = plot_memory(df)"),
    ("Compile time", "Seconds of the first call of the compiled backends (compilation + one run).",
     ["plot_compile_time"], "figs = plot_compile_time(df)"),
    ("Correctness", "‖out − ref‖/‖ref‖ against the float64 reference; the dashed line is the runner's tolerance.",
     ["plot_correctness"], "figs = plot_correctness(df, TOLERANCES)"),
]
EMPTY = 'if not figs:\n    print("no data for this figure in the table")'


def _definitions() -> dict:
    """report_plots' top-level statements by name, in file order (imports under '<imports>')."""
    source = inspect.getsource(report_plots)
    parts: dict = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the module docstring
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            name = "<imports>"
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        else:
            name = ast.unparse(node.targets[0] if isinstance(node, ast.Assign) else node.target)
        text = ast.get_source_segment(source, node, padded=False)
        comments = _leading_comments(source, node)
        parts[name] = (parts[name] + "\n" if name in parts else "") + comments + text
    return parts


def _leading_comments(source: str, node) -> str:
    lines = source.splitlines()
    i, found = node.lineno - 2, []
    while i >= 0 and lines[i].startswith("#"):
        found.insert(0, lines[i])
        i -= 1
    return "".join(line + "\n" for line in found)


def _join(texts) -> str:
    """Definitions spaced as in a file: two blank lines around functions, none between constants."""
    parts, after_def = [], False
    for text in texts:
        is_def = any(line.startswith(("def ", "class ")) for line in text.splitlines())
        if parts:
            parts.append("\n\n\n" if is_def or after_def else "\n")
        parts.append(text)
        after_def = is_def
    return "".join(parts)


def build(table: str, tuning: str, tolerances: dict, command: str):
    import nbformat.v4 as nbf

    defs = _definitions()
    shown = {name for _, _, names, _ in SECTIONS for name in names} | {"plot_tuning", "<imports>"}
    helpers = _join(text for name, text in defs.items() if name not in shown)
    cells = [
        nbf.new_markdown_cell(
            "# Flashlight report\n\nReloads the report's table and redraws each of its figures; the code that "
            "draws them is in the cells (the same functions as `flashlight/report/plots.py`). Re-run all "
            "cells to redraw; regenerate the report and this notebook with\n\n"
            f"```\n{command or 'python -m flashlight.report RUN_OR_SWEEP_DIR'}\n```"),
        nbf.new_code_cell("%matplotlib inline\nfrom pathlib import Path\n\nfrom IPython.display import Image, "
                          "SVG, display\n\n" + defs["<imports>"]),
        nbf.new_markdown_cell("## Helpers\nTable types, colours per backend, labels, layout."),
        nbf.new_code_cell(helpers),
        nbf.new_markdown_cell("## The table\nEvery row the report used (`source` names the CSV it came from); "
                              "counts by backend and status:"),
        nbf.new_code_cell(f"TABLE = Path({table!r})\nTUNING = Path({tuning!r})\n"
                          f"TOLERANCES = {tolerances!r}  # the runner's pass/fail tolerance per (dtype, device)\n\n"
                          "df = tidy(pd.read_csv(TABLE))\n"
                          'df.groupby(["backend", "status"]).size().unstack(fill_value=0)'),
    ]
    for heading, text, names, call in SECTIONS:
        cells += [nbf.new_markdown_cell(f"## {heading}\n{text}"),
                  nbf.new_code_cell("\n\n\n".join(defs[n] for n in names) + f"\n\n\n{call}\n{EMPTY}")]
    cells += [
        nbf.new_markdown_cell("## Rows not ok\nExcluded from the speed figures, with the runner's reason."),
        nbf.new_code_cell('df[df["status"] != "ok"][["variant", "backend", "mode", "Sq", "D", "status", "reason"]]'),
        nbf.new_markdown_cell("## Tuning\nOptuna trial tables and pictures found with the results, if any."),
        nbf.new_code_cell(
            defs["plot_tuning"] + "\n\n\n"
            'records = sorted(TUNING.glob("*")) if TUNING.exists() else []\n'
            "for path in records:\n"
            '    if path.suffix == ".csv":\n'
            "        trials = pd.read_csv(path)\n"
            '        if {"number", "value", "state"} <= set(trials.columns):\n'
            "            plot_tuning(trials, path.name)\n"
            "        else:\n"
            "            display(trials.head(30))\n"
            '    elif path.suffix == ".png":\n'
            "        display(Image(filename=str(path)))\n"
            '    elif path.suffix == ".svg":\n'
            "        display(SVG(filename=str(path)))\n"
            "if not records:\n"
            '    print("no tuning records")'),
    ]
    nb = nbf.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def _quiet_log():
    """nbclient logs each execution at INFO, which Hydra's logging setup (report=true) would print."""
    log = logging.getLogger("flashlight.report.notebook")
    log.setLevel(logging.WARNING)
    return log


def write(path: Path, table: Path, tuning: Path, tolerances: dict, command: str = "") -> list:
    """Write and execute the notebook at `path`; returns notes on what could not be done."""
    try:
        import nbformat
    except ImportError:
        return ["notebook skipped: nbformat is not installed (pip install nbformat nbclient ipykernel)"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    here = path.parent.resolve()
    rel = lambda p: Path(os.path.relpath(Path(p).resolve(), here)).as_posix()  # noqa: E731
    nb = build(rel(table), rel(tuning), tolerances, command)
    nbformat.validate(nb)
    notes = []
    try:
        from nbclient import NotebookClient

        NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                       # the kernel's own log (a warning about local TCP) is not the user's business
                       extra_arguments=["--log-level=ERROR"], log=_quiet_log(),
                       resources={"metadata": {"path": str(here)}}).execute()
    except ImportError:
        notes.append(f"{path}: written but not executed: nbclient is not installed (pip install nbclient ipykernel)")
    except Exception as e:  # a failing cell, or no Jupyter kernel: keep the notebook, say why
        first = str(e).strip().splitlines()
        notes.append(f"{path}: written, but executing it failed ({type(e).__name__}: "
                     f"{first[-1][:200] if first else ''}); open it in Jupyter to see the cell")
    nbformat.write(nb, str(path))
    return notes
