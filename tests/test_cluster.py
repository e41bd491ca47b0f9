"""Sweeps on a real single-node Slurm cluster (hydra/launcher=slurm) and Optuna studies shared through a
real PostgreSQL server, as a user runs them (README: "Running on a GPU cluster").

The daemons are started by scripts/cluster/slurm.sh and scripts/cluster/postgres.sh in a fresh dir under
/tmp, on loopback, and stopped by their pids when the tests end, also when one fails. Without the daemons'
binaries, root (slurmd) or the `cluster` extra these tests skip and say why -- except under CI=true or
FLASHLIGHT_REQUIRE_CLUSTER=1, where that is a failure: CI must not go green without running them.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from flashlight.harness.run import CASE_KEY, case_keys, merge_results, read_results

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts" / "cluster"
REQUIRED = os.environ.get("CI", "").lower() in ("true", "1") or os.environ.get("FLASHLIGHT_REQUIRE_CLUSTER") == "1"
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} -- required here (CI=true or FLASHLIGHT_REQUIRE_CLUSTER=1); "
                    "`bash .ci/run` installs what the cluster tests need", pytrace=False)
    pytest.skip(reason)


def missing_binaries(names) -> list:
    return [n for n in names if shutil.which(n, path=SBIN_PATH) is None]


def missing_modules(names) -> list:
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is None]


def start(script: str, what: str, packages: str, needs_root: bool, binaries, modules):
    """Start a daemon set with scripts/cluster/SCRIPT in a fresh dir; returns (dir, stop function)."""
    gone = missing_binaries(binaries)
    if gone:
        unavailable(f"{what}: {', '.join(gone)} not installed (Debian: apt-get install {packages}; "
                    f"`bash .ci/run` does it)")
    if needs_root and os.geteuid() != 0:
        unavailable(f"{what}: needs root (slurmd starts jobs as the submitting user)")
    gone = missing_modules(modules)
    if gone:
        unavailable(f"{what}: Python module(s) {', '.join(gone)} missing: pip install -e '.[cluster]'")
    d = Path(tempfile.mkdtemp(prefix=f"flashlight-{script.split('.')[0]}-"))
    env = {**os.environ, "PATH": SBIN_PATH}

    def stop():
        p = subprocess.run(["bash", str(SCRIPTS / script), "stop", str(d)], capture_output=True, text=True,
                           env=env, timeout=180)
        left = [f.name for f in d.glob("*.pid")]
        assert p.returncode == 0 and not left, f"{script} stop: {p.stdout}{p.stderr} (pid files left: {left})"
        shutil.rmtree(d, ignore_errors=True)

    p = subprocess.run(["bash", str(SCRIPTS / script), "start", str(d)], capture_output=True, text=True,
                       env=env, timeout=300)
    if p.returncode != 0:
        stop()
        pytest.fail(f"{script} start failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}", pytrace=False)
    return d, stop


@pytest.fixture(scope="module")
def slurm():
    """A running single-node cluster; yields the environment that points Slurm's commands at it."""
    d, stop = start("slurm.sh", "Slurm test cluster", "slurm-wlm slurmdbd munge mariadb-server", True,
                    ["munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db", "sbatch",
                     "sacct", "scancel", "squeue"],
                    ["hydra_plugins.hydra_submitit_launcher", "submitit"])
    try:
        yield {**os.environ, "PATH": SBIN_PATH, "SLURM_CONF": str(d / "slurm.conf")}
    finally:
        stop()


@pytest.fixture(scope="module")
def postgres_url():
    import glob

    # Debian keeps initdb and postgres in /usr/lib/postgresql/<version>/bin, off PATH
    binaries = [] if shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb") else ["initdb"]
    d, stop = start("postgres.sh", "PostgreSQL test server", "postgresql", False, binaries, ["psycopg2"])
    try:
        yield (d / "url").read_text().strip()
    finally:
        stop()


# ------------------------------------------------------------------------------------------ Slurm sweep
SWEEP = ["variant=causal,alibi,vanilla", "shape=tiny", "backends=[eager,flashlight]",
         "timing.warmup=1", "timing.repeat=4"]
CASES = {(v, b) for v in ("causal", "alibi", "vanilla") for b in ("eager", "flashlight")}
# the test cluster: one node, 2 CPUs, no GPUs
ON_TEST_CLUSTER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null",
                   "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]


def sweep_cmd(sweep_dir, *extra):
    return [sys.executable, "-m", "flashlight.run", "-m", *ON_TEST_CLUSTER, f"hydra.sweep.dir={sweep_dir}",
            *SWEEP, *extra]


def squeue(env, *args) -> list:
    p = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def rows_by_case(df: pd.DataFrame) -> dict:
    return {(r["variant"], r["backend"]): r for r in df.to_dict("records")}


def test_sweep_on_slurm_resumes_after_a_killed_job(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**slurm, "TRITON_INTERPRET": "1"}  # must reach the jobs (sbatch exports the environment)

    # 1. kill a running job after its first case, while it measures its second. Between reading its
    # results.csv and the kill landing, the job may finish that case and exit (it did: the launcher then
    # rightly exited 0 and the test failed). So the job is suspended (SIGSTOP) first and its file read
    # again: only a job frozen with one row is killed; one that got further is resumed and left alone.
    first = subprocess.Popen(sweep_cmd(sweep, "hydra.launcher.array_parallelism=2"), env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def rows(f):
        try:
            return pd.read_csv(f)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, FileNotFoundError):  # being written
            return None

    def scontrol(*args):
        return subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, timeout=30)

    killed = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and first.poll() is None:
        for f in sweep.glob("*/results.csv"):
            df = rows(f)
            # array task i runs Hydra job i, which writes into <sweep>/i/
            running = {i.split("_")[-1]: i for i in squeue(env, "-t", "R", "-o", "%i")}
            if df is None or len(df) != 1 or f.parent.name not in running:
                continue
            task = running[f.parent.name]
            if scontrol("suspend", task).returncode != 0:   # it ended meanwhile, or did not stop:
                scontrol("resume", task)                    # never leave a frozen job behind
                continue
            df = rows(f)
            if df is not None and len(df) == 1:
                # SIGKILL: no grace period (KillWait) in which the case could still finish
                subprocess.run(["scancel", "--signal=KILL", task], env=env, check=True, timeout=30)
                killed = (task, f.parent.name, df.iloc[0].to_dict())
                break
            scontrol("resume", task)
        time.sleep(0.1)
    out1, _ = first.communicate(timeout=300)
    assert killed, f"no job was caught between its two cases:\n{out1[-3000:]}"
    job, job_dir, kept = killed
    assert first.returncode != 0, out1[-3000:]  # the launcher reports the job it lost
    assert "CANCELLED" in out1, out1[-3000:]
    before = read_results(sweep)
    assert len(pd.read_csv(sweep / job_dir / "results.csv")) == 1, "the killed job finished its case anyway"

    # 2. the same command again (any job of the first launch still running is waited for, not duplicated)
    second = subprocess.run(sweep_cmd(sweep, "hydra.launcher.array_parallelism=2"), env=env, text=True,
                            capture_output=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    every = read_results(sweep)  # raw rows of every job file: no case twice, none missing
    keys = case_keys(every)
    assert not keys.duplicated().any(), every[keys.duplicated(keep=False)][CASE_KEY]
    assert {(r["variant"], r["backend"]) for r in every.to_dict("records")} == CASES
    assert len(every) == len(CASES)
    got = rows_by_case(every)
    for r in got.values():  # flashlight fused and ran in the jobs: the interpreter reached them
        assert r["status"] == "ok", r
    # every row finished before the relaunch is kept as it was (not measured again)
    for r in before.to_dict("records"):
        assert got[(r["variant"], r["backend"])]["ms"] == r["ms"], (r, got[(r["variant"], r["backend"])])
    assert got[(kept["variant"], "eager")]["ms"] == kept["ms"]
    # the relaunch measured only what was missing, and said so in the jobs' logs
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))
    assert logs.count("already measured") >= len(before.groupby("variant")), logs[-3000:]
    merged = merge_results(sweep)
    assert len(merged) == len(CASES) and set(case_keys(merged)) == set(keys)

    # the accounting database saw the kill (this is what the launcher read)
    p = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job.split("_")[0]], env=env,
                       capture_output=True, text=True, timeout=30)
    assert any(line.startswith(job + "|CANCELLED") for line in p.stdout.splitlines()), p.stdout


# ------------------------------------------------------------------------------------------ shared Optuna study
def test_two_slurm_workers_tune_one_optuna_study_on_postgres(slurm, postgres_url, tmp_path):
    """Two Slurm jobs of one sweep tune the same case (hence the same study) through the runner's
    tune=true, sharing the PostgreSQL storage: the study holds every trial of both, each once."""
    import optuna

    n_trials = 3
    sweep = tmp_path / "tune-sweep"
    p = subprocess.run(
        [sys.executable, "-m", "flashlight.run", "-m", *ON_TEST_CLUSTER, "hydra.launcher.array_parallelism=2",
         f"hydra.sweep.dir={sweep}", "variant=causal", "shape=tiny", "shape.Sq=64", "shape.Sk=64",
         "backends=[flashlight]", "timing.warmup=1", "timing.repeat=2", "tune=true",
         f"tune.n_trials={n_trials}", f"tune.storage={postgres_url}", "tune.seed=0,1"],
        env={**slurm, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    rows = read_results(sweep)
    assert len(rows) == 2 and set(rows["status"]) == {"ok"}, rows[["status", "reason"]]
    assert all(str(r).startswith("tuned (") for r in rows["reason"]), list(rows["reason"])
    # the two jobs ran at the same time (the accounting database has their start and end)
    (job,) = {d.name.split("_")[0] for d in sweep.glob(".submitit/*_*") if d.is_dir()}  # <array job>_<task>
    for _ in range(60):  # slurmctld hands finished jobs to slurmdbd a moment later
        acct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,Start,End", "-j", job], env=slurm,
                              capture_output=True, text=True, timeout=30).stdout.split()
        spans = [line.split("|")[1:] for line in acct]
        if len(spans) == 2 and all(e[:1].isdigit() for _, e in spans):
            break
        time.sleep(0.5)
    assert len(spans) == 2 and max(s for s, _ in spans) < min(e for _, e in spans), acct

    (summary,) = optuna.get_all_study_summaries(postgres_url)  # one case, one kernel: one study
    study = optuna.load_study(study_name=summary.study_name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(2 * n_trials))  # both workers' trials, once each
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in finished for t in trials), [t.state for t in trials]
    assert study.best_trial.user_attrs["config"]


# ------------------------------------------------------------------------------------------ no daemons
def test_interpreter_choice_is_not_inherited_by_gpu_jobs(tmp_path):
    """The runner turns the Triton interpreter on where there is no GPU driver; a Slurm job submitted from
    such a login node inherits the environment, and on a GPU node it must not keep the interpreter."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")  # only its presence on PATH is looked at
    (fake_bin / "nvidia-smi").chmod(0o755)
    no_gpu_path = ":".join(p for p in os.environ["PATH"].split(":") if not (Path(p) / "nvidia-smi").exists())
    probe = "import os, flashlight.harness.run; print(os.environ.get('TRITON_INTERPRET'))"
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLASHLIGHT_AUTO_INTERPRET")}

    def interpret(path, **env):
        p = subprocess.run([sys.executable, "-c", probe], env={**base, "PATH": path, **env}, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    assert interpret(no_gpu_path) == "1"                                       # login node: on
    inherited = {"TRITON_INTERPRET": "1", "FLASHLIGHT_AUTO_INTERPRET": "1"}
    assert interpret(f"{fake_bin}:{no_gpu_path}", **inherited) == "None"       # GPU node: off again
    assert interpret(f"{fake_bin}:{no_gpu_path}", TRITON_INTERPRET="1") == "1"  # a user's own choice wins


def test_merge_keeps_one_row_per_case_the_last(tmp_path):
    def write(d, rows, mtime):
        d.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(d / "results.csv", index=False)
        os.utime(d / "results.csv", (mtime, mtime))

    case = {"variant": "causal", "mode": "fwd", "dtype": "float32", "device": "cpu", "gpu": None, "B": 1, "H": 4,
            "Sq": 128, "Sk": 128, "D": 16, "Dv": 16, "params": None, "status": "ok"}
    write(tmp_path / "0", [{**case, "backend": "eager", "ms": 1.0}, {**case, "backend": "sdpa", "ms": 2.0},
                           {**case, "backend": "eager", "ms": 3.0}], 1000)
    write(tmp_path / "1", [{**case, "backend": "sdpa", "ms": 4.0},
                           {**case, "backend": "sdpa", "params": "{'window': 8}", "ms": 5.0},
                           {**case, "backend": "sdpa", "Sq": 256, "ms": 6.0}], 2000)
    merged = merge_results(tmp_path)
    assert sorted(merged["ms"]) == [3.0, 4.0, 5.0, 6.0]  # eager: later row of file 0; sdpa: file 1 (newer)
    assert len(read_results(tmp_path)) == 6

    out = subprocess.run([sys.executable, str(SCRIPTS / "merge_sweep.py"), str(tmp_path), "-o",
                          str(tmp_path / "all.csv")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "4 cases from 6 rows" in out.stdout
    assert len(pd.read_csv(tmp_path / "all.csv")) == 4


def test_rerun_only_what_is_missing_unless_resume_false(tmp_path):
    def run(*args):
        p = subprocess.run([sys.executable, "-m", "flashlight.run", "variant=causal", "shape=tiny",
                            "timing.warmup=1", "timing.repeat=2", f"hydra.run.dir={tmp_path}", *args],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    run("backends=[eager]")
    first = pd.read_csv(tmp_path / "results.csv")
    out = run("backends=[eager,sdpa]")
    assert "resume: eager already measured" in out
    df = pd.read_csv(tmp_path / "results.csv")
    assert list(df["backend"]) == ["eager", "sdpa"] and df["ms"][0] == first["ms"][0]
    run("backends=[eager]", "resume=false")  # measured again: a second row, the merge keeps the new one
    df = pd.read_csv(tmp_path / "results.csv")
    assert list(df["backend"]) == ["eager", "sdpa", "eager"]
    merged = merge_results(tmp_path)
    assert len(merged) == 2 and merged.set_index("backend")["ms"]["eager"] == df["ms"][2]


def test_slurm_launcher_config():
    from hydra import compose, initialize_config_dir

    from flashlight.harness.run import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher")
        assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
        assert launcher.timeout_min > 0 and launcher.array_parallelism > 0 and list(launcher.setup) == []
        default = compose("config", return_hydra_config=True).hydra.launcher
        assert default._target_.endswith("BasicLauncher")  # local runs stay the default


def _first_use(url):
    from flashlight import tune
    import optuna

    optuna.create_study(storage=tune.open_storage(url), study_name="first-use", load_if_exists=True)
    return True


def test_workers_reaching_a_fresh_database_at_once_all_get_the_study(postgres_url):
    """Four workers create Optuna's tables at the same moment: PostgreSQL fails all but one of them
    (duplicate key in pg_type); flashlight.tune retries, so every worker gets the one study."""
    import multiprocessing as mp
    import uuid

    import optuna
    import sqlalchemy as sa

    schema = f"race_{uuid.uuid4().hex[:8]}"   # a fresh, empty schema: Optuna's tables do not exist yet
    with sa.create_engine(postgres_url).begin() as c:
        c.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = f"{postgres_url}?options=-csearch_path%3D{schema}"
    with mp.get_context("spawn").Pool(4) as pool:
        assert pool.map(_first_use, [url] * 4) == [True] * 4
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["first-use"]
