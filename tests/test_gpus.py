"""hydra/launcher=gpus on CPU: N GPUs simulated by the launching process's CUDA_VISIBLE_DEVICES (the jobs run on
CPU and record the GPU they were given in gpu_index). Disjoint GPUs, queueing, failed jobs reported, resume,
and two tuning workers sharing one SQLite study (README: "Sweeps over every GPU of one host")."""
import os
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from flashlight.harness import gpus
from flashlight.harness.run import case_keys, read_results

FAST = ["shape=tiny", "backends=[eager]", "timing.warmup=1", "timing.repeat=1"]


def sweep(tmp_path, sweep_dir, *overrides, cvd="0,1"):
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": cvd,
           "FLASHLIGHT_CACHE_DIR": str(tmp_path / "cache")}
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
