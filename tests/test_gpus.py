"""hydra/launcher=gpus on CPU: N GPUs simulated by the launching process's CUDA_VISIBLE_DEVICES (the jobs run on
CPU and record the GPU they were given in gpu_index). Disjoint GPUs, queueing, failed jobs reported, resume,
the longest expected job first (recorded durations, else an estimate), each job's share of the CPUs, and two
tuning workers sharing one SQLite study (README: "Sweeps over every GPU of one host")."""
import json
import os
import re
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from flashlight.harness import gpus
from flashlight.harness.run import case_keys, read_results

FAST = ["shape=tiny", "backends=[eager]", "timing.warmup=1", "timing.repeat=1"]


def sweep(tmp_path, sweep_dir, *overrides, cvd="0,1", env=None):
    """The launcher as a user starts it; env: variables of the launching shell, beside these (the CPU share's
    variables are left out of pytest's environment unless given here)."""
    base = {k: v for k, v in os.environ.items() if k not in gpus.CPU_SHARE_VARS}
    env = {**base, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": cvd,
           "FLASHLIGHT_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "flashlight.run", "-m", "hydra/launcher=gpus",
                           f"hydra.launcher.lock_dir={tmp_path / 'locks'}", "hydra.launcher.poll_s=0.05",
                           f"hydra.sweep.dir={sweep_dir}", *overrides],
                          capture_output=True, text=True, env=env, timeout=300)


# ------------------------------------------------------------------------------------------ no processes
def test_visible_gpus():
    assert gpus.visible_gpus(None, {"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert gpus.visible_gpus(1, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2"]
    assert gpus.visible_gpus([0, 5], {}) == ["0", "5"]
    assert gpus.visible_gpus("GPU-a,GPU-b", {}) == ["GPU-a", "GPU-b"]
    for bad in [(None, {"CUDA_VISIBLE_DEVICES": ""}), (3, {"CUDA_VISIBLE_DEVICES": "0,1"}), ([1, 1], {})]:
        with pytest.raises(gpus.NoGpus):
            gpus.visible_gpus(*bad)


class FakeJob:
    def __init__(self, seconds, active, lock):
        self.end, self.active, self.lock = time.time() + seconds, active, lock

    def done(self):
        if time.time() >= self.end:
            with self.lock:
                self.active.discard(self)
            return True
        return False


def test_queue_one_job_per_gpu_at_a_time():
    active, lock, seen = set(), threading.Lock(), []

    def submit(item, gpu):
        job = FakeJob(0.02 * (item % 3 + 1), active, lock)
        with lock:
            assert gpu not in {j.gpu for j in active}, "two jobs on one GPU"
            job.gpu = gpu
            active.add(job)
            seen.append(len(active))
        return job

    out = gpus.run_queue(list(range(7)), ["0", "1", "2"], submit, poll_s=0.005, log=lambda m: None)
    assert [r["item"] for r in out] == list(range(7)) and max(seen) == 3
    for g in "012":  # per GPU, one job after the other
        spans = sorted((r["start"], r["end"]) for r in out if r["gpu"] == g)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def started_order(out):
    return [r["item"] for r in sorted(out, key=lambda r: r["start"])]


def test_queue_starts_the_longest_expected_first():
    active, lock = set(), threading.Lock()

    def submit(item, gpu):
        return FakeJob(0.01, active, lock)

    # one GPU: the start order is the whole order; ties (the two 5s, the two 1s) keep the order of items
    out = gpus.run_queue(list("abcdef"), ["0"], submit, poll_s=0.002, log=lambda m: None,
                         expected=[1, 5, 3, 5, 1, 8])
    assert started_order(out) == list("fbdcae")
    assert [r["item"] for r in out] == list("abcdef")  # returned in the order of items, as before
    assert [r["expected"] for r in out] == [1, 5, 3, 5, 1, 8]
    out = gpus.run_queue(list("abc"), ["0"], submit, poll_s=0.002, log=lambda m: None)  # none: item order
    assert started_order(out) == list("abc")
    with pytest.raises(ValueError):
        gpus.run_queue(list("abc"), ["0"], submit, expected=[1, 2])


def test_longest_first_cuts_the_paper_sweeps_tail():
    """The paper-shape sweep's jobs as they ran on two H200s (results/h200x2_gpus_launcher/gpu_jobs_2gpu.csv,
    seconds scaled down 100x), replayed on 2 GPUs: in sweep order the 66 s job starts last and the GPUs are
    busy 162 s (the measured span was 163 s); longest first, 157 s."""
    secs = [28.65, 27.63, 24.65, 23.03, 21.24, 21.24, 65.89, 23.22, 22.42, 28.84, 23.22]
    active, lock, walls = set(), threading.Lock(), []

    def submit(item, gpu):
        return FakeJob(secs[item] / 100, active, lock)

    for expected in (None, secs):
        out = gpus.run_queue(list(range(len(secs))), ["0", "1"], submit, poll_s=0.001, log=lambda m: None,
                             expected=expected)
        walls.append(max(sum(secs[r["item"]] for r in out if r["gpu"] == g) for g in "01"))  # in H200 s
    assert walls[0] > 160 > walls[1], walls
    assert started_order(out)[0] == 6


def test_expected_seconds_history_wins_then_estimate_then_mean():
    got = gpus.expected_seconds([[3.0, 40.0, 2.0], [], [10.0], []], [5.0, 50.0, 20.0, None])
    # recorded: the longest run (a resumed rerun measured nothing and was quick), whatever the estimate says
    assert got[0] == (40.0, "history") and got[2] == (10.0, "history")
    # estimated: rescaled by the recorded jobs' seconds / their estimates, (40 + 10) / (5 + 20) = 2
    assert got[1] == (pytest.approx(100.0), "estimate")
    assert got[3] == (pytest.approx((40 + 100 + 10) / 3), "mean")  # neither: the mean of the others
    assert gpus.expected_seconds([[], []], [2.0, 3.0]) == [(2.0, "estimate"), (3.0, "estimate")]
    assert gpus.expected_seconds([[], []], [None, None]) == [(0.0, "mean"), (0.0, "mean")]  # sweep order


def test_estimate_seconds_from_the_config():
    def est(variant="vanilla", backends=("eager", "flex"), mode="fwd", shape=None, tune=None):
        return gpus.estimate_seconds({"variant": variant, "backends": backends, "mode": mode,
                                      "shape": shape or {"name": "paper", "B": 4, "H": 32, "Sq": 4096, "Sk": 4096},
                                      "tune": tune or {}})

    base = est()
    assert est(mode="fwdbwd") > base
    assert est(backends=("eager", "flex", "sdpa")) > base > est(backends=("eager",))
    # a variant whose Flex mask is rebuilt per batch (MASK_INPUTS) costs the compile of create_block_mask,
    # for its flex backend only
    assert est("document_mask") > base and est("document_mask", ("eager",)) == est("vanilla", ("eager",))
    tiny = {"name": "tiny", "B": 1, "H": 4, "Sq": 128, "Sk": 128}
    assert est(shape=tiny) < base
    assert est(shape={"name": "auto", "B": None, "H": None, "Sq": None, "Sk": None}) == base  # auto: paper
    assert est(tune={"enabled": True, "n_trials": 10}) > est(tune={"enabled": False, "n_trials": 10}) == base
    assert est(backends="flex") == est(backends=["flex"])
    with pytest.raises(KeyError):
        est("no_such_variant")
    # the paper sweep: the per-batch mask variant is expected longest, by about as much as it took
    paper = {v: est(v, ("flashlight", "flex", "sdpa")) for v in ("vanilla", "causal", "document_mask")}
    assert paper["vanilla"] == paper["causal"] and 2 < paper["document_mask"] / paper["vanilla"] < 4


def test_history_file_roundtrip_and_broken_files(tmp_path, capsys):
    h = tmp_path / "cache" / gpus.HISTORY_FILE
    assert gpus.read_history(h) == {}  # missing: nothing recorded, no warning
    assert capsys.readouterr().err == ""
    for s in range(7):
        gpus.record_history(h, "b=2 a=1", s + 0.123)
    gpus.record_history(h, "c=3", 4)
    assert gpus.read_history(h) == {"b=2 a=1": [2.12, 3.12, 4.12, 5.12, 6.12], "c=3": [4.0]}  # the last 5
    assert not list(h.parent.glob("*.tmp"))

    for broken in ("{not json", "[1, 2]", ""):
        h.write_text(broken)
        assert gpus.read_history(h) == {}
        assert "ignoring the job history" in capsys.readouterr().err
        gpus.record_history(h, "c=3", 1.5)  # rewritten whole, readable again
        assert gpus.read_history(h) == {"c=3": [1.5]}
    h.write_text(json.dumps({"a=1": [1, "x", None, -2, float("inf"), True, 7.5], "b=2": "x", "c=3": []}))
    assert gpus.read_history(h) == {"a=1": [1.0, 7.5]}  # entries that are not durations are left out

    blocked = tmp_path / "file"
    blocked.write_text("")
    gpus.record_history(blocked / "h.json", "a=1", 1.0)  # cannot be written: a warning, no exception
    assert "could not record" in capsys.readouterr().err
    assert gpus.job_key(["b=2", "a=1"]) == gpus.job_key("a=1 b=2") == "a=1 b=2"


def test_job_log_gains_expected_column_and_is_read_back(tmp_path, capsys):
    log = tmp_path / "gpu_jobs.csv"
    log.write_text("job,gpu,start,end,seconds,state,overrides\n"  # an older launcher's file
                   '0,0,1.0,31.0,30.00,COMPLETED,"variant=a mode=fwd"\n'
                   '1,1,1.0,3.0,2.00,FAILED: X,"variant=b"\n')
    rec = {"job": 2, "gpu": "1", "start": "5.0", "end": "9.5", "seconds": "4.50", "state": "COMPLETED",
           "overrides": "mode=fwd variant=a", "expected_s": "30.0"}
    gpus.write_job_log(log, [rec])
    gpus.write_job_log(log, [{**rec, "job": 3, "seconds": "x"}])
    df = pd.read_csv(log)
    assert list(df.columns) == gpus.JOB_LOG_COLUMNS and list(df["job"]) == [0, 1, 2, 3]
    assert df["expected_s"].isna().tolist() == [True, True, False, False]
    # only completed jobs with a duration count; the same overrides in another order are the same job
    assert gpus.read_job_log(log) == {"mode=fwd variant=a": [30.0, 4.5]}
    assert gpus.read_job_log(tmp_path / "missing.csv") == {}
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert gpus.read_job_log(tmp_path / "bad.csv") == {}
    assert capsys.readouterr().err.count("ignoring") == 1


def test_cpu_share_and_slices_on_a_fake_host():
    # 8 CPUs, 2 GPUs: 4 each, the first GPU's job on CPUs 0-3, the second's on 4-7
    assert gpus.cpu_share("auto", 2, 8) == 4 and gpus.cpu_share(" AUTO ", 3, 8) == 2
    assert gpus.cpu_share("auto", 4, 2) == 1  # never 0
    assert gpus.cpu_share(3, 2, 8) == gpus.cpu_share("3", 2, 8) == 3  # forced
    for off in (None, False, "off", "null", "none", "OFF"):
        assert gpus.cpu_share(off, 2, 8) is None
    for bad in (0, -2, "many", 2.5, True):
        with pytest.raises(ValueError):
            gpus.cpu_share(bad, 2, 8)
    assert gpus.cpu_slices(["0", "1"], 4, range(8)) == {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}
    # the CPUs this process may use, not 0..n-1 (a taskset or cgroup allotment); GPUs in their given order
    assert gpus.cpu_slices(["3", "1"], 2, [14, 12, 10, 8]) == {"3": [8, 10], "1": [12, 14]}
    assert gpus.cpu_slices(["0", "1"], 5, range(8)) == {}  # forced 5 × 2 > 8: not pinned, would overlap
    assert gpus.cpu_slices(["0", "1"], None, range(8)) == {}
    assert gpus.cpu_list_text([7, 0, 1, 2, 3, 5]) == "0-3,5,7" and gpus.cpu_list_text([4]) == "4"


def test_job_cpu_env_keeps_what_the_user_set():
    both = {"TORCHINDUCTOR_COMPILE_THREADS": "4", "OMP_NUM_THREADS": "4"}
    assert gpus.job_cpu_env(4, {}) == both
    assert gpus.job_cpu_env(4, {"OMP_NUM_THREADS": "7"}) == {"TORCHINDUCTOR_COMPILE_THREADS": "4"}
    assert gpus.job_cpu_env(4, {"OMP_NUM_THREADS": "", "TORCHINDUCTOR_COMPILE_THREADS": "2"}) == {
        "OMP_NUM_THREADS": "4"}  # set but empty counts as unset
    assert gpus.job_cpu_env(None, {}) == {}  # off


CHILD = "import os; print(os.environ.get('TORCHINDUCTOR_COMPILE_THREADS'), os.environ.get('OMP_NUM_THREADS'), " \
        "sorted(os.sched_getaffinity(0)))"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_started_with_gives_the_child_its_env_and_cpus_then_restores(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    cpus = gpus.usable_cpus()
    one = cpus[-1:]  # a slice of one CPU (on a one-CPU host the same as all of them)
    with gpus.started_with({"TORCHINDUCTOR_COMPILE_THREADS": "4", "OMP_NUM_THREADS": "3"}, one):
        child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    assert child.stdout.strip().split(None, 2) == ["4", "3", str(one)]
    assert "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ and os.environ["OMP_NUM_THREADS"] == "7"
    assert gpus.usable_cpus() == cpus
    with pytest.raises(KeyError):  # restored when starting the job fails too
        with gpus.started_with({"OMP_NUM_THREADS": "3"}, one):
            raise KeyError
    assert os.environ["OMP_NUM_THREADS"] == "7" and gpus.usable_cpus() == cpus
    with gpus.started_with({}, None):  # off: the child gets this process's environment and CPUs
        child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    assert child.stdout.strip().split(None, 2) == ["None", "7", str(cpus)]


# ------------------------------------------------------------------------------------------ end to end
def test_sweep_spreads_queues_reports_and_resumes(tmp_path):
    s = tmp_path / "sweep"
    # 3 jobs on 2 GPUs: one waits for a GPU; the float8 job fails (unknown dtype), the others go on
    p = sweep(tmp_path, s, "variant=vanilla", "dtype=float8,float32,float64", *FAST)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert "1 of 3 job(s) did not finish" in out and "#0 (variant=vanilla dtype=float8" in out and "on GPU 0: " in out, out[-3000:]
    log = pd.read_csv(s / "gpu_jobs.csv", dtype={"gpu": str})
    assert len(log) == 3 and set(log["gpu"]) == {"0", "1"}
    assert list(log["state"] == "COMPLETED") == [False, True, True]
    for _, g in log.groupby("gpu"):  # each GPU ran its jobs one after the other
        spans = sorted(zip(g["start"], g["end"]))
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    first = read_results(s)
    assert sorted(first["dtype"]) == ["float32", "float64"] and set(first["status"]) == {"ok"}
    # each row names the GPU its job was given (on CPU: the simulated one), the one gpu_jobs.csv says
    by_job = {str(r["job"]): str(r["gpu"]) for r in log.to_dict("records")}
    for f in s.glob("*/results.csv"):
        assert str(pd.read_csv(f)["gpu_index"][0]) == by_job[f.parent.name]

    # a job lost its rows (killed before writing): the sweep again (on other GPUs) measures only that case
    lost = next(f for f in s.glob("*/results.csv") if pd.read_csv(f)["dtype"][0] == "float64")
    lost.unlink()
    p = sweep(tmp_path, s, "variant=vanilla", "dtype=float32,float64", *FAST, cvd="3,4")
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    every = read_results(s)
    assert len(every) == 2 and not case_keys(every).duplicated().any()
    again = {r["dtype"]: r for r in every.to_dict("records")}
    kept = first[first["dtype"] == "float32"].iloc[0]
    assert again["float32"]["ms"] == kept["ms"] and str(again["float32"]["gpu_index"]) == str(kept["gpu_index"])
    assert str(again["float64"]["gpu_index"]) in {"3", "4"}
    logs = "".join(f.read_text() for f in s.glob(".submitit/*/*_log.out"))
    assert "resume: eager already measured" in logs


def test_sweep_starts_the_longest_expected_first_and_records_durations(tmp_path):
    history = tmp_path / "cache" / gpus.HISTORY_FILE
    history.parent.mkdir(parents=True)
    history.write_text("{broken")  # ignored (a warning), then rewritten as the jobs finish
    args = ["variant=vanilla", "mode=fwd,fwdbwd", *FAST]

    def started(s):
        log = pd.read_csv(s / "gpu_jobs.csv")
        return log, list(log.sort_values("start", kind="stable")["job"])

    # nothing recorded: the estimate, by which #1 (fwdbwd) costs more than #0 (fwd) and starts first
    p = sweep(tmp_path, tmp_path / "s1", *args)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "ignoring the job history" in p.stdout + p.stderr
    log, order = started(tmp_path / "s1")
    assert order == [1, 0] and log["expected_s"][1] > log["expected_s"][0] > 0
    assert list(log["overrides"].str.split().str[1]) == ["mode=fwd", "mode=fwdbwd"]  # Hydra's numbering kept
    # each completed job's seconds recorded under its overrides, for the next sweep
    fwd, fwdbwd = (gpus.job_key(o) for o in log["overrides"])
    recorded = gpus.read_history(history)
    assert set(recorded) == {fwd, fwdbwd}
    for key, seconds in zip((fwd, fwdbwd), log["seconds"]):
        assert recorded[key] == [pytest.approx(seconds, abs=0.011)]

    # the next sweep (another dir) reads them, and they win over the estimate: fwd recorded longer goes first
    history.write_text(json.dumps({fwd: [2.0, 90.0], fwdbwd: [3.0]}))
    p = sweep(tmp_path, tmp_path / "s2", *args)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    log, order = started(tmp_path / "s2")
    assert order == [0, 1] and list(log["expected_s"]) == [90.0, 3.0]
    assert "(expected 90.0 s, history)" in p.stdout + p.stderr
    assert [len(v) for v in gpus.read_history(history).values()] == [3, 2]  # this sweep's runs added

    # resuming that sweep without the history file: its own gpu_jobs.csv from the earlier attempt counts
    history.unlink()
    earlier = log.copy()
    p = sweep(tmp_path, tmp_path / "s2", *args)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    log, _ = started(tmp_path / "s2")
    assert len(log) == 4 and list(log["job"]) == [0, 1, 0, 1]
    assert list(log["expected_s"][2:]) == pytest.approx(list(earlier["seconds"]), abs=0.051)
    assert set(gpus.read_history(history)) == {fwd, fwdbwd}


def cpu_set(text):
    """"0-3,8" -> {0, 1, 2, 3, 8}"""
    out = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def job_reports(sweep_dir):
    """What each job saw from inside (the line the launcher prints in the job's process): {GPU: (compile
    threads, OMP threads, CPUs)}, one job per GPU here."""
    out = {}
    for f in sweep_dir.glob(".submitit/*/*_log.out"):
        for m in re.finditer(r"^flashlight: job on GPU (\S+): TORCHINDUCTOR_COMPILE_THREADS=(\S+) "
                             r"OMP_NUM_THREADS=(\S+) CPUs=(\S+) ", f.read_text(), re.M):
            assert m[1] not in out, "two jobs on one GPU"
            out[m[1]] = (m[2], m[3], cpu_set(m[4]))
    return out


@pytest.mark.parametrize("setting", ["auto", "3", "off"])
def test_sweep_gives_each_job_its_cpu_share(tmp_path, setting):
    """Each job's process starts with TORCHINDUCTOR_COMPILE_THREADS / OMP_NUM_THREADS = its share and on CPUs
    of its own; a variable set in the launching shell (here OMP_NUM_THREADS=7 with auto) is kept; off leaves
    the environment and CPUs as they are. The host is this one: usable CPUs // 2 GPUs (a fake 8-CPU host:
    test_cpu_share_and_slices_on_a_fake_host)."""
    host = set(gpus.usable_cpus())
    user = {"OMP_NUM_THREADS": "7"} if setting == "auto" else {}
    s = tmp_path / "sweep"
    p = sweep(tmp_path, s, "variant=vanilla", "dtype=float32,float64", *FAST,
              f"hydra.launcher.cpus_per_job={setting}", env=user)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    seen = job_reports(s)
    assert set(seen) == {"0", "1"}, out[-3000:]
    log = pd.read_csv(s / "gpu_jobs.csv", dtype={"gpu": str, "cpus": str})
    assert list(log.columns) == gpus.JOB_LOG_COLUMNS and log.columns[-1] == "cpus"
    if setting == "off":
        assert all(v == ("unset", "unset", host) for v in seen.values()), seen
        assert log["cpus"].isna().all() and "CPU share: off" in out
        return
    share = max(1, len(host) // 2) if setting == "auto" else 3
    omp = "7" if setting == "auto" else str(share)
    assert all(v[:2] == (str(share), omp) for v in seen.values()), seen
    assert list(log["cpus"]) == [str(share)] * 2
    if setting == "auto":
        assert "(OMP_NUM_THREADS=7 kept as set)" in out
    if 2 * share <= len(host):  # pinned: disjoint slices of the share, of the CPUs the launcher may use
        (a, b) = (seen[g][2] for g in "01")
        assert len(a) == len(b) == share and not a & b and a | b <= host, seen
    else:  # a forced share that does not fit: not pinned, every job on every CPU
        assert all(v[2] == host for v in seen.values()) and "not pinned" in out, seen


def test_two_tuning_workers_share_one_sqlite_study(tmp_path):
    import optuna

    db, n = tmp_path / "tune.db", 1
    p = sweep(tmp_path, tmp_path / "tune", "variant=causal", "shape=tiny", "shape.H=2", "shape.Sq=64",
              "shape.Sk=64", "backends=[flashlight]", "timing.warmup=1", "timing.repeat=1", "tune=true",
              f"tune.n_trials={n}", f"tune.storage=sqlite:///{db}", "tune.seed=0,1")
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rows = read_results(tmp_path / "tune")
    assert len(rows) == 2 and set(rows["status"]) == {"ok"}, rows[["status", "reason"]]
    assert all(str(r).startswith("tuned (") for r in rows["reason"]), list(rows["reason"])
    assert sorted(rows["gpu_index"].astype(str)) == ["0", "1"]
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{db}")
    trials = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{db}").get_trials()
    assert sorted(t.number for t in trials) == list(range(2 * n))  # both workers' trials, each once
    assert all(t.state.is_finished() for t in trials)


def test_gpu_scaling_script_times_the_same_sweep_on_1_and_n_gpus(tmp_path):
    """scripts/gpu_scaling.py (the issue's 2-GPU vs 1-GPU measurement) on 2 simulated GPUs: both sweeps run
    from empty caches, measure the same cases, and their walls and launcher spans are written."""
    base = {k: v for k, v in os.environ.items() if k not in gpus.CPU_SHARE_VARS}
    env = {**base, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "0,1"}
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_scaling.py")
    p = subprocess.run([sys.executable, script, "--gpus", "2", "--variants", "vanilla,causal", "--shape", "tiny",
                        "--backends", "eager", "--out", str(tmp_path / "out"), "timing.warmup=1", "timing.repeat=1",
                        f"hydra.launcher.lock_dir={tmp_path / 'locks'}"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "same cases and statuses: True" in out, out[-3000:]
    walls = pd.read_csv(tmp_path / "out" / "walls.csv")
    assert list(walls["gpus"]) == [1, 2] and (walls["rc"] == 0).all() and (walls["jobs"] == 2).all()
    assert (walls["launcher_span_s"] <= walls["wall_s"]).all()
    assert set(pd.read_csv(tmp_path / "out" / "gpu_jobs_2gpu.csv", dtype={"gpu": str})["gpu"]) == {"0", "1"}
