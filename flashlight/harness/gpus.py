"""Spreading a sweep's jobs over the GPUs of one host (hydra/launcher=gpus), one job per GPU at a time.

The Hydra launcher (hydra_plugins/flashlight_launcher/gpus_launcher.py) starts each job through submitit's
local executor, with CUDA_VISIBLE_DEVICES set to the one GPU it holds; the jobs beyond the GPU count wait
for a GPU to come free. This module is the part that needs neither Hydra nor submitit: which GPUs there
are, the queue, and the per-GPU lock a job holds while it runs.

submitit's own local executor starts every job at once and gives each CUDA_VISIBLE_DEVICES=0..gpus_per_node-1
(the same GPUs for all of them), which is why the queue is here and not in submitit.

The queue starts the longest expected job first (LPT: a long job started last would set the sweep's wall
time alone on one GPU). The expected seconds of a job (expected_seconds) are the longest run recorded for
its overrides, in the history file of the cache dir (updated as each job completes) or in the sweep dir's
gpu_jobs.csv from an earlier attempt; without any, a rough estimate from its config (estimate_seconds).

Each job gets its share of the host's CPUs (hydra.launcher.cpus_per_job): every job compiles kernels, and
Inductor sizes its pool of compile workers, and torch its intra-op threads, to every CPU of the host, so N
jobs at once would oversubscribe the CPUs N times (on 2 H200s, each job ran ~20% longer beside another).
cpu_share is the number (usable CPUs // jobs at once), job_cpu_env the environment it sets
(TORCHINDUCTOR_COMPILE_THREADS, OMP_NUM_THREADS, where the user has not), cpu_slices the disjoint CPUs each
GPU's job is pinned to, and started_with the context the launcher starts a job's process in.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence


class NoGpus(RuntimeError):
    pass


def visible_gpus(setting: Any = None, environ=None) -> list[str]:
    """The physical GPUs jobs may use, as CUDA_VISIBLE_DEVICES entries (indices, or GPU-/MIG- UUIDs).

    setting: None -> this process's CUDA_VISIBLE_DEVICES if set, else every GPU the driver reports;
    an int N -> the first N of those; a list (or "0,2") -> exactly those."""
    environ = os.environ if environ is None else environ
    if isinstance(setting, (list, tuple)) or (isinstance(setting, str) and setting.strip()):
        items = setting.split(",") if isinstance(setting, str) else setting
        gpus = [str(g).strip() for g in items if str(g).strip()]
    else:
        cvd = environ.get("CUDA_VISIBLE_DEVICES")
        if cvd is not None:
            gpus = [g.strip() for g in cvd.split(",") if g.strip()]
        else:
            gpus = [str(i) for i in range(_driver_gpu_count())]
        if isinstance(setting, int) and not isinstance(setting, bool):
            if setting > len(gpus):
                raise NoGpus(f"hydra.launcher.gpus={setting}, but only {len(gpus)} GPU(s) are visible: {gpus}")
            gpus = gpus[:setting]
    if len(set(gpus)) != len(gpus):
        raise NoGpus(f"a GPU is named twice in {gpus}: two jobs would share it")
    if not gpus:
        raise NoGpus("hydra/launcher=gpus: no GPU is visible (CUDA_VISIBLE_DEVICES is empty or the driver "
                     "finds none); name them with hydra.launcher.gpus=[0,1], or use the default launcher")
    return gpus


def _driver_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()  # NVML where it can: no CUDA context in the launching process
    except Exception:
        return 0


class GpuLock:
    """An exclusive lock on one physical GPU for as long as a job runs on it (flock on a file in lock_dir,
    /tmp by default): jobs of a launcher killed earlier, or of another sweep on this host, are waited for,
    never run beside. Released when the process ends, however it ends."""

    def __init__(self, gpu: str, lock_dir: str | os.PathLike | None = None):
        self.gpu = gpu
        d = Path(lock_dir or tempfile.gettempdir())
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"flashlight-gpu-{gpu}.lock"
        self._f = None

    def __enter__(self):
        import fcntl

        # read-only is enough for flock: a lock file another user created (umask 022) still opens
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)
        self._f = os.fdopen(fd, "r")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"flashlight: GPU {self.gpu} is in use by another flashlight job ({self.path}): waiting for it",
                  file=sys.stderr, flush=True)
            fcntl.flock(self._f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self._f.close()  # closing the file releases the lock
        return False


def run_queue(items: Sequence[Any], gpus: Sequence[str], submit: Callable[[Any, str], Any],
              poll_s: float = 0.2, log: Callable[[str], None] = print,
              name: Callable[[int, Any], str] = lambda i, item: str(i),
              expected: Sequence[float] | None = None,
              on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every item, at most one per GPU at a time; an item waits for the next free GPU.

    The next free GPU gets the remaining item with the longest expected[i] (seconds); ties, and every item
    when expected is None, go in the order of items. submit(item, gpu) starts it and returns a job with
    .done(); on_done(record) is called as each one finishes. Returns, in the order of items, one dict each:
    item, gpu, job, start, end (time.time()), expected."""
    if expected is not None and len(expected) != len(items):
        raise ValueError(f"{len(items)} items but {len(expected)} expected durations")
    todo = list(enumerate(items))
    if expected is not None:
        todo.sort(key=lambda t: -expected[t[0]])  # stable: equal expectations keep the order of items
    free = list(gpus)
    running: dict[int, dict] = {}
    out: list[dict | None] = [None] * len(items)
    try:
        while todo or running:
            while todo and free:
                i, item = todo.pop(0)
                gpu = free.pop(0)
                running[i] = out[i] = {"item": item, "gpu": gpu, "job": submit(item, gpu), "start": time.time(),
                                       "end": None, "expected": None if expected is None else expected[i]}
            for i, r in list(running.items()):
                if r["job"].done():
                    r["end"] = time.time()
                    free.append(r["gpu"])
                    del running[i]
                    took = f"{r['end'] - r['start']:.1f} s"
                    if r["expected"] is not None:
                        took += f" (expected {r['expected']:.1f} s)"
                    log(f"#{name(i, r['item'])} finished on GPU {r['gpu']} in {took}")
                    if on_done is not None:
                        on_done(r)
            if running:
                time.sleep(poll_s)
    except BaseException:  # an interrupted launch stops its jobs rather than leaving them on the GPUs
        for r in running.values():
            try:
                r["job"].cancel(check=False)
            except Exception:
                pass
        raise
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ CPU share
CPU_SHARE_VARS = ("TORCHINDUCTOR_COMPILE_THREADS", "OMP_NUM_THREADS")  # Inductor's compile workers, torch's threads


def usable_cpus() -> list[int]:
    """The CPUs this process may run on: its affinity (taskset, a cgroup or Slurm allotment), else all of
    os.cpu_count() where the platform has no affinity (macOS)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cpu_share(setting: Any, jobs_at_once: int, n_cpus: int) -> int | None:
    """CPUs (threads) per job for hydra.launcher.cpus_per_job = setting: "auto" -> max(1, n_cpus // jobs_at_once);
    an int N (or "N") -> N; null, false or "off" -> None (the jobs' environment is left as it is)."""
    if setting is None or setting is False or (isinstance(setting, str) and setting.strip().lower() in
                                               ("off", "null", "none", "false", "")):
        return None
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        return max(1, n_cpus // max(1, jobs_at_once))
    try:
        n = int(setting) if not isinstance(setting, (bool, float)) else None
    except ValueError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"hydra.launcher.cpus_per_job={setting!r}: auto, a number of CPUs >= 1, or off/null")
    return n


def job_cpu_env(share: int | None, environ=None) -> dict[str, str]:
    """The variables a job is started with for its share: each of CPU_SHARE_VARS = share, except those the
    user set (non-empty) in environ (this process's environment), which the job inherits as they are."""
    environ = os.environ if environ is None else environ
    if share is None:
        return {}
    return {var: str(share) for var in CPU_SHARE_VARS if not environ.get(var)}


def cpu_slices(gpus: Sequence[str], share: int | None, cpus: Sequence[int]) -> dict[str, list[int]]:
    """The CPUs each GPU's job is pinned to: consecutive slices of share CPUs of cpus, in the order of gpus,
    disjoint since each GPU runs one job at a time. {} (no pinning) when there is no share, or the slices do
    not fit (a forced cpus_per_job × GPUs > CPUs), or the platform cannot pin (no os.sched_setaffinity)."""
    cpus = sorted(cpus)
    if share is None or share * len(gpus) > len(cpus) or not hasattr(os, "sched_setaffinity"):
        return {}
    return {g: cpus[i * share:(i + 1) * share] for i, g in enumerate(gpus)}


def cpu_list_text(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 3, 8] -> "0-3,8" (as taskset -c and /proc/<pid>/status write them)."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@contextmanager
def started_with(env: dict[str, str], cpus: Sequence[int] | None = None):
    """Around starting a job's process (a subprocess.Popen inside): this process's environment gains env and
    the calling thread runs on cpus (None: as it is); a child started inside inherits both, from its first
    instruction (its threads and worker processes too). Both are restored on the way out. Not thread-safe:
    the launcher starts its jobs from one thread."""
    saved = {k: os.environ.get(k) for k in env}
    old_cpus = os.sched_getaffinity(0) if cpus else None
    try:
        os.environ.update(env)
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError as e:  # a CPU gone offline since: the job runs unpinned, with its thread counts
                _warn(f"could not pin a job to CPUs {cpu_list_text(cpus)} ({e}); it runs on any")
        yield
    finally:
        if old_cpus is not None:
            os.sched_setaffinity(0, old_cpus)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def job_cpu_report(environ=None) -> str:
    """What a job got, from inside it: its CPU_SHARE_VARS and the CPUs it may run on (one log line)."""
    environ = os.environ if environ is None else environ
    threads = " ".join(f"{v}={environ.get(v) or 'unset'}" for v in CPU_SHARE_VARS)
    cpus = usable_cpus()
    return f"{threads} CPUs={cpu_list_text(cpus)} ({len(cpus)} of {os.cpu_count()})"


JOB_LOG_COLUMNS = ["job", "gpu", "start", "end", "seconds", "state", "overrides", "expected_s", "cpus"]


def write_job_log(path: Path, records: list[dict]) -> None:
    """<sweep dir>/gpu_jobs.csv: which GPU ran which job, when, how it ended, how long it was expected to take,
    and its CPU share (cpus; empty with cpus_per_job off). Appended per launch; a file with other columns, from
    an older launcher, is rewritten with these."""
    old = None
    if path.exists():
        with open(path, newline="") as f:
            if next(csv.reader(f), None) != JOB_LOG_COLUMNS:
                f.seek(0)
                old = list(csv.DictReader(f))
    with open(path, "a" if old is None and path.exists() else "w", newline="") as f:
        w = csv.DictWriter(f, JOB_LOG_COLUMNS, restval="", extrasaction="ignore")
        if f.tell() == 0:
            w.writeheader()
        w.writerows([*(old or []), *records])


# ------------------------------------------------------------------------------------------ expected seconds
HISTORY_FILE = "gpu_jobs_history.json"  # in the cache dir: {job_key: [seconds of its last completed runs]}
HISTORY_KEEP = 5


def job_key(overrides: str | Sequence[str]) -> str:
    """A job's overrides (hydra.* left out, as in gpu_jobs.csv) as the key of its recorded durations: the same
    in any order on the command line."""
    text = overrides if isinstance(overrides, str) else " ".join(overrides)
    return " ".join(sorted(text.split()))


def history_path() -> Path:
    """<cache dir>/gpu_jobs_history.json: FLASHLIGHT_CACHE_DIR or ~/.cache/flashlight, beside the kernels."""
    from flashlight.compiler.runtime import cache_dir

    return cache_dir().parent / HISTORY_FILE


def _warn(msg: str) -> None:
    print(f"flashlight: {msg}", file=sys.stderr, flush=True)


def _seconds(v: Any) -> float | None:
    try:
        s = float(v)
    except (TypeError, ValueError):
        return None
    return s if math.isfinite(s) and s >= 0 and not isinstance(v, bool) else None


def read_history(path: Path) -> dict[str, list[float]]:
    """The recorded durations, {job_key: [seconds, ...]}; a missing file is empty, a broken one is ignored."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _warn(f"ignoring the job history {path} ({type(e).__name__}: {e}); it is rewritten as jobs finish")
        return {}
    out = {}
    for key, runs in data.items():
        secs = [s for s in map(_seconds, runs if isinstance(runs, list) else []) if s is not None]
        if secs:
            out[str(key)] = secs
    return out


def record_history(path: Path, key: str, seconds: float, keep: int = HISTORY_KEEP) -> None:
    """Add one completed run to the history (its last `keep` runs per key). Sweeps running at once on this
    host take turns (flock); the file is replaced whole, never left half written. Never raises: a history
    that cannot be written only costs the next sweep its order."""
    import fcntl

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            history = read_history(path)
            history[key] = [*history.get(key, []), round(float(seconds), 2)][-keep:]
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(history, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)
    except OSError as e:
        _warn(f"could not record the job's duration in {path}: {e}")


def read_job_log(path: Path) -> dict[str, list[float]]:
    """The seconds of the COMPLETED jobs of a sweep dir's gpu_jobs.csv, {job_key: [seconds, ...]}; a missing or
    unreadable file gives none."""
    out: dict[str, list[float]] = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                s = _seconds(row.get("seconds"))
                if row.get("state") == "COMPLETED" and s is not None and row.get("overrides") is not None:
                    out.setdefault(job_key(row["overrides"]), []).append(s)
    except FileNotFoundError:
        pass
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        _warn(f"ignoring the earlier job log {path} ({type(e).__name__}: {e})")
    return out


# A rough job's duration in seconds, by its config, for when no run of it was recorded. The constants are
# rounded from the paper-shape sweep on an H200 (results/h200x2_gpus_launcher: 21-29 s for 3 backends in
# mode=fwd, 65 s for the variant whose Flex block mask is rebuilt per batch, ~3 s per tuning trial); only
# the order they give matters, and a sweep with recorded runs rescales them (expected_seconds).
JOB_S = 6.0            # the process: start, imports, the eager reference
BACKEND_S = 6.0        # one backend in mode=fwd: compile it, check it, time it
FWDBWD_FACTOR = 2.0    # mode=fwdbwd: the backward compiled, checked and timed too
MASK_BUILD_S = 40.0    # Flex on a variant with MASK_INPUTS: create_block_mask compiled, and rebuilt per batch
TRIAL_S = 3.0          # tune=true: one trial of the flashlight kernel's tile configs
PAPER_SCORES = 4 * 32 * 4096 * 4096  # B·H·Sq·Sk of shape=paper


def estimate_seconds(job: dict) -> float:
    """A job's rough duration from its config: job = {variant, backends, mode, shape: {B, H, Sq, Sk, ...},
    tune: {enabled, n_trials}}, as composed for it.

        JOB_S + size × (backends × BACKEND_S [× FWDBWD_FACTOR] + MASK_BUILD_S [flex on MASK_INPUTS]
                        + n_trials × TRIAL_S [tune=true])

    size = log2(B·H·Sq·Sk) / log2 of the paper shape's: larger shapes cost more, mildly (on a GPU compiling
    costs more than the timed calls); a shape left to auto (or incomplete) counts as the paper shape, what
    auto means on a GPU. Whether the variant rebuilds its mask per batch is read from its module
    (MASK_INPUTS, flashlight/harness/variant_registry.py). Raises if the variant is unknown."""
    from flashlight.harness import variant_registry as registry

    variant = registry.get(job["variant"])
    backends = [job["backends"]] if isinstance(job["backends"], str) else list(job["backends"])
    per_backend = BACKEND_S * (FWDBWD_FACTOR if job.get("mode") == "fwdbwd" else 1.0)
    work = per_backend * len(backends)
    if "flex" in backends and variant.has_flex and variant.mask_inputs:
        work += MASK_BUILD_S
    tune = job.get("tune") or {}
    if tune.get("enabled"):
        work += TRIAL_S * int(tune.get("n_trials") or 0)
    shape = job.get("shape") or {}
    dims = [shape.get(k) for k in ("B", "H", "Sq", "Sk")]
    size = 1.0
    if all(isinstance(d, int) and d > 0 for d in dims):
        size = max(1.0, math.log2(math.prod(dims))) / math.log2(PAPER_SCORES)
    return JOB_S + size * work


def expected_seconds(recorded: Sequence[Sequence[float]], estimates: Sequence[float | None]
                     ) -> list[tuple[float, str]]:
    """Each job's expected seconds and where they come from, from its recorded runs (history, the sweep's
    earlier gpu_jobs.csv) and its estimate (None: none could be made):

    - recorded runs: the longest of them ("history"; a rerun that found its cases already measured took
      seconds, and must not make a long job look short);
    - else the estimate ("estimate"), rescaled when other jobs of the sweep have recorded runs: × their
      recorded seconds / their estimates, so that the two compare on this machine;
    - else the mean of the others ("mean"; 0 when no job has either: the order of the sweep)."""
    known = [max(r) if r else None for r in recorded]
    pairs = [(k, e) for k, e in zip(known, estimates) if k is not None and e]
    scale = sum(k for k, _ in pairs) / sum(e for _, e in pairs) if pairs else 1.0
    out: list[tuple[float | None, str]] = [
        (k, "history") if k is not None else (e * scale, "estimate") if e is not None else (None, "mean")
        for k, e in zip(known, estimates)]
    values = [v for v, _ in out if v is not None]
    mean = sum(values) / len(values) if values else 0.0
    return [(mean if v is None else v, src) for v, src in out]
