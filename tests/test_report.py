"""Reports (python -m flashlight.report) from synthetic tables in the runner's schema, from real runs
(report=true, single run and multirun), and from bad input. Numbers are checked against the data."""
import math
import os
import statistics
import subprocess
import sys

import matplotlib.image
import nbformat
import pandas as pd
import pytest

from flashlight.report import build as report
from flashlight.results_schema import COLUMNS

GPU = "NVIDIA H100 80GB HBM3"
FAST = ["shape=tiny", "timing.warmup=1", "timing.repeat=2", "backends=[eager,sdpa]"]


def row(variant="causal", backend="flashlight", Sq=4096, ms=1.0, status="ok", **kw):
    r = dict(variant=variant, backend=backend, mode="fwd", dtype="bfloat16", device="cuda", B=4, H=32, Sq=Sq,
             Sk=Sq, D=64, Dv=64, ms=ms, tflops=100.0 / ms, rel_err=2e-3, status=status, reason="",
             peak_mem_mb=Sq / 8, compile_s=1.5, torch="2.11.0", triton="3.6.0", gpu=GPU, params="")
    if status != "ok":
        r.update(ms=None, tflops=None, rel_err=None, peak_mem_mb=None, compile_s=None)
    return {**r, **kw}


def write(path, rows, columns=COLUMNS):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).reindex(columns=columns).to_csv(path, index=False)
    return path


def sweep_rows():
    """Two variants at two lengths, flashlight/flex/sdpa; sdpa cannot do softcap; one wrong row;
    'compile' only fails."""
    rows = []
    for variant in ("causal", "softcap"):
        for Sq in (1024, 4096):
            rows.append(row(variant, "flex", Sq, ms=2.0 * Sq / 1024))
            rows.append(row(variant, "flashlight", Sq, ms=(1.0 if variant == "causal" else 4.0) * Sq / 1024))
            rows.append(row(variant, "sdpa", Sq, ms=1.6 * Sq / 1024) if variant == "causal" else
                        row(variant, "sdpa", Sq, status="unsupported", reason="tanh softcap is not expressible"))
            rows.append(row(variant, "compile", Sq, status="error", reason="RuntimeError: boom"))
    rows.append(row("alibi", "flashlight", 4096, ms=3.0, status="wrong", rel_err=0.5,
                    reason="rel err 0.5 > tol 0.02"))
    rows.append(row("alibi", "flex", 4096, ms=2.0))
    return rows


@pytest.fixture
def sweep(tmp_path):
    rows = sweep_rows()
    write(tmp_path / "sweep" / "0" / "results.csv", rows[: len(rows) // 2])
    write(tmp_path / "sweep" / "1" / "results.csv", rows[len(rows) // 2:])
    return tmp_path / "sweep"


def report_cli(*args, cwd=None):
    """The command a user types, in-process (fast): returns exit status."""
    return report.main([str(a) for a in args])


def md(out):
    return (out / "report.md").read_text()


def test_sweep_report_files_and_numbers(sweep, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report_cli(sweep, "-o", out, "--no-notebook") == 0
    assert capsys.readouterr().out.strip().endswith("report.md")
    text = md(out)
    for name in ["report.md", "report.html", "all_results.csv", ".flashlight-report"]:
        assert (out / name).exists(), name
    stems = {p.stem for p in (out / "figures").glob("*.png")}
    assert {p.stem for p in (out / "figures").glob("*.svg")} == stems
    tag = f"fwd_bfloat16_{GPU.replace(' ', '_')}"
    assert stems == {f"tflops_fwd_d64_bfloat16_{GPU.replace(' ', '_')}", f"speedup_{tag}",
                     f"peak_mem_mb_fwd_d64_bfloat16_{GPU.replace(' ', '_')}", f"compile_{tag}", f"rel_err_{tag}"}
    for stem in stems:
        assert matplotlib.image.imread(out / "figures" / f"{stem}.png").shape[0] > 200
        assert f"figures/{stem}.png" in text
    html = (out / "report.html").read_text()
    assert "<table>" in html and "figures/" in html and "<h2>Speedup over FlexAttention</h2>" in html

    # geometric mean speedup over flex, computed here from the raw rows
    raw = pd.concat(pd.read_csv(p) for p in sorted(sweep.rglob("results.csv")))
    ok = raw[raw.status == "ok"].set_index(["variant", "Sq", "backend"])["ms"]
    for backend in ("flashlight", "sdpa"):
        ratios = [ok[(v, s, "flex")] / ok[(v, s, backend)] for v, s, b in ok.index if b == backend]
        gm = statistics.geometric_mean(ratios)
        line = next(ln for ln in text.splitlines() if ln.startswith("| fwd") and f"| {backend} " in ln)
        assert f"| {len(ratios)} " in line and f"{gm:.2f}×" in line, line
    # flashlight: causal 2x faster (2 cases), softcap 2x slower (2 cases); alibi is wrong, so not counted
    assert math.isclose(report.rp.geomean_table(report.rp.speedups(report.rp.tidy(raw)))
                        .set_index("backend").loc["flashlight", "geomean"], 1.0)

    # TFLOP/s of ok rows in the results table; statuses elsewhere; failures listed with their reasons
    causal = next(ln for ln in text.splitlines() if ln.startswith("| causal") and "S4096" in ln)
    assert f"{100 / 4.0:.3g}" in causal and "error" in causal  # flashlight 25 TFLOP/s, compile failed
    failed = text.split("## Rows not ok")[1]
    assert "tanh softcap is not expressible" in failed and "RuntimeError: boom" in failed
    assert "rel err 0.5 > tol 0.02" in failed
    # a backend with only failed rows: said so, the rest still reported
    assert "backend compile: no row with status ok (4 error)" in text
    merged = pd.read_csv(out / "all_results.csv")
    assert len(merged) == len(raw) and set(COLUMNS) <= set(merged.columns) and "source" in merged


def test_notebook_is_executed_with_outputs(sweep, tmp_path):
    out, nb_path = tmp_path / "rep", tmp_path / "notebooks" / "sweep.ipynb"
    assert report_cli(sweep, "-o", out, "--notebook", nb_path) == 0
    assert "](../notebooks/sweep.ipynb)" in md(out)
    nb = nbformat.read(nb_path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = sum("image/png" in o.get("data", {}) for o in outputs)
    assert pngs == len(list((out / "figures").glob("*.png")))  # every figure of the report, redrawn
    assert any("def plot_speedup" in c.source for c in code)  # the code is in view
    # it ran from its own folder, as Jupyter runs it, and needs nothing from flashlight
    assert not any("flashlight" in line and "import" in line for c in code for line in c.source.splitlines())


def test_later_table_wins_and_mixed_schema(tmp_path):
    old = write(tmp_path / "old.csv", [row(ms=4.0), row(backend="flex", ms=2.0)],
                columns=[c for c in COLUMNS if c not in ("peak_mem_mb", "compile_s")])
    new = write(tmp_path / "new.csv", [row(ms=1.0), row(variant="vanilla", extra=7)], columns=COLUMNS + ["extra"])
    out = tmp_path / "rep"
    assert report_cli(old, new, "-o", out, "--no-notebook") == 0
    text = md(out)
    assert "mixed schema versions (2 column layouts)" in text
    assert "old.csv lacks peak_mem_mb, compile_s (left empty)" in text and "new.csv" in text and "extra" in text
    assert "1 case(s) of " in text and "old.csv were measured again in " in text and "new.csv (given later)" in text
    merged = pd.read_csv(out / "all_results.csv").set_index(["variant", "backend"])
    assert merged.loc[("causal", "flashlight"), "ms"] == 1.0 and len(merged) == 3
    assert "2.00×" in text  # flex 2.0 ms / flashlight 1.0 ms, from the later table


@pytest.mark.parametrize("setup, message", [
    (lambda d: d.mkdir(), "no results table below it"),
    (lambda d: None, "no such file or directory"),
    (lambda d: write(d / "x.csv", [{"a": 1, "b": 2}], columns=["a", "b"]), "not a results table"),
    (lambda d: write(d / "results.csv", [row()], columns=[c for c in COLUMNS if c != "tflops"]),
     "without the column(s) tflops"),
    (lambda d: write(d / "results.csv", [], columns=COLUMNS), "a header without rows"),
])
def test_nothing_to_report_exits_nonzero_with_reason(tmp_path, capsys, setup, message):
    d = tmp_path / "run"
    setup(d)
    assert report_cli(d, "-o", tmp_path / "rep", "--no-notebook") == 1
    err = capsys.readouterr().err
    assert "nothing to report" in err and message in err, err
    assert not (tmp_path / "rep").exists()


def test_bad_inputs_beside_good_ones_still_give_a_report(sweep, tmp_path):
    (tmp_path / "empty").mkdir()
    write(tmp_path / "odd" / "results.csv", [row()], columns=[c for c in COLUMNS if c != "ms"])
    torn = tmp_path / "torn" / "results.csv"
    write(torn, [row(variant="vanilla")])
    with open(torn, "a") as f:
        head = "vanilla,flex,fwd,bfloat16,cuda,4,32,4096,4096,64,64,1.0".split(",")  # more fields than columns:
        f.write(",".join(head + [str(i) for i in range(len(COLUMNS) + 2 - len(head))]) + "\n")  # torn/garbled
    out = tmp_path / "rep"
    assert report_cli(sweep, tmp_path / "empty", tmp_path / "odd", torn, tmp_path / "nope", "-o", out,
                      "--no-notebook") == 0
    text = md(out)
    assert "empty: no results table below it" in text
    assert "odd/results.csv: a results table without the column(s) ms" in text
    assert "torn/results.csv: 1 malformed line(s) skipped" in text
    assert "nope: no such file or directory" in text
    assert len(pd.read_csv(out / "all_results.csv")) == len(sweep_rows()) + 1


def test_only_failed_rows(tmp_path):
    write(tmp_path / "run" / "results.csv", [row(status="error", reason="boom"),
                                             row(backend="flex", status="oom", reason="CUDA out of memory")])
    out = tmp_path / "rep"
    assert report_cli(tmp_path / "run", "-o", out, "--no-notebook") == 0
    text = md(out)
    assert "(no row has status ok)" in text and "CUDA out of memory" in text and "boom" in text
    assert "backend flex: no row with status ok (1 oom)" in text
    assert not list((out / "figures").glob("tflops*"))


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # its matplotlib plots
def test_tuning_records_are_included(sweep, tmp_path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        x = trial.suggest_int("BLOCK_N", 16, 128, step=16)
        if x == 16:
            raise optuna.TrialPruned()
        if x == 128:
            raise ValueError("shared memory exceeded")
        return 1.0 + abs(x - 64) / 64

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=12, catch=(ValueError,))
    study.trials_dataframe().to_csv(tmp_path / "sweep" / "0" / "tuning_trials.csv", index=False)
    import matplotlib.pyplot as plt

    fig = optuna.visualization.matplotlib.plot_optimization_history(study).figure
    (sweep / "optuna").mkdir()
    fig.savefig(sweep / "optuna" / "history.png")
    plt.close(fig)
    out = tmp_path / "rep"
    assert report_cli(sweep, "-o", out, "--no-notebook") == 0
    text = md(out)
    assert "## Tuning" in text
    assert (out / "tuning" / "0__tuning_trials.csv").exists() and (out / "tuning" / "optuna__history.png").exists()
    assert (out / "figures" / "tuning_0__tuning_trials.png").exists()
    complete = study.trials_dataframe().query("state == 'COMPLETE'")
    assert f"{len(study.trials)} trials, {len(complete)} complete, best value {complete.value.min():.4g}" in text


def runner(*args, tmp_dir_arg):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-m", "flashlight.run", *args, *FAST, "report=true", tmp_dir_arg],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_runner_report_true_single_run(tmp_path):
    p = runner("variant=causal", tmp_dir_arg=f"hydra.run.dir={tmp_path}")
    out = tmp_path / "report"
    assert "report:" in p.stdout and (out / "report.md").exists() and (out / "report.ipynb").exists()
    rows = pd.read_csv(tmp_path / "results.csv")
    text = md(out)
    for r in rows.to_dict("records"):
        assert f"{r['tflops']:.3g}" in text  # the run's own numbers
    assert (out / "figures" / "tflops_fwd_d16_float32_cpu.png").exists()
    assert "no peak memory recorded" in text  # CPU
    nb = nbformat.read(out / "report.ipynb", as_version=4)
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_runner_report_true_multirun_one_report_for_the_sweep(tmp_path):
    runner("-m", "variant=vanilla,causal", tmp_dir_arg=f"hydra.sweep.dir={tmp_path}")
    assert sorted(p.parent.name for p in tmp_path.rglob("report.md")) == ["report"]
    assert (tmp_path / "report" / "report.md").exists()
    merged = pd.read_csv(tmp_path / "report" / "all_results.csv")
    assert sorted(set(merged["variant"])) == ["causal", "vanilla"] and len(merged) == 4
    # a second report of the same sweep does not read the first one back
    assert report_cli(tmp_path, "--no-notebook") == 0
    assert len(pd.read_csv(tmp_path / "report" / "all_results.csv")) == 4
