"""Spreading a sweep's jobs over the GPUs of one host (hydra/launcher=gpus), one job per GPU at a time.

The Hydra launcher (hydra_plugins/flashlight_launcher/gpus_launcher.py) starts each job through submitit's
local executor, with CUDA_VISIBLE_DEVICES set to the one GPU it holds; the jobs beyond the GPU count wait
for a GPU to come free. This module is the part that needs neither Hydra nor submitit: which GPUs there
are, the queue, and the per-GPU lock a job holds while it runs.

submitit's own local executor starts every job at once and gives each CUDA_VISIBLE_DEVICES=0..gpus_per_node-1
(the same GPUs for all of them), which is why the queue is here and not in submitit.
"""
from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
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
              name: Callable[[int, Any], str] = lambda i, item: str(i)) -> list[dict]:
    """Run every item, at most one per GPU at a time, in order; an item waits for the next free GPU.

    submit(item, gpu) starts it and returns a job with .done(); returns, in the order of items, one dict
    each: item, gpu, job, start, end (time.time())."""
    todo = list(enumerate(items))
    free = list(gpus)
    running: dict[int, dict] = {}
    out: list[dict | None] = [None] * len(items)
    try:
        while todo or running:
            while todo and free:
                i, item = todo.pop(0)
                gpu = free.pop(0)
                running[i] = out[i] = {"item": item, "gpu": gpu, "job": submit(item, gpu), "start": time.time(),
                                       "end": None}
            for i, r in list(running.items()):
                if r["job"].done():
                    r["end"] = time.time()
                    free.append(r["gpu"])
                    del running[i]
                    log(f"#{name(i, r['item'])} finished on GPU {r['gpu']} in {r['end'] - r['start']:.1f} s")
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


JOB_LOG_COLUMNS = ["job", "gpu", "start", "end", "seconds", "state", "overrides"]


def write_job_log(path: Path, records: list[dict]) -> None:
    """<sweep dir>/gpu_jobs.csv: which GPU ran which job, when, and how it ended (appended per launch)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, JOB_LOG_COLUMNS)
        if new:
            w.writeheader()
        w.writerows(records)
