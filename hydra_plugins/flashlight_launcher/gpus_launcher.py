"""hydra/launcher=gpus: a multirun over every GPU of this host, one job per GPU at a time (configs/hydra/launcher/gpus.yaml).

Each Hydra job runs as a submitit local job (its own process, pickled task, logs and result under
<sweep dir>/.submitit/<pid>/) with CUDA_VISIBLE_DEVICES set to the one GPU it holds; the jobs beyond the
GPU count queue (flashlight.harness.gpus), the longest expected first. Each job gets its share of the
host's CPUs (cpus_per_job, pin_cpus): its process starts with TORCHINDUCTOR_COMPILE_THREADS and
OMP_NUM_THREADS set to it and, where the slices fit, on CPUs of its own. A job that fails or is killed does
not stop the others; the launch then fails naming it. Imports here stay light: Hydra imports every
hydra_plugins module at start.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class GpusLauncher(Launcher):
    def __init__(self, **params: Any) -> None:
        self.params = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                       for k, v in params.items()}
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    # ------------------------------------------------------------------ in the job's process
    def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: Dict[type, Singleton]) -> JobReturn:
        import submitit

        from flashlight.harness import gpus as pool
        from flashlight.harness.gpus import GpuLock

        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, sweep_overrides)
        with open_dict(sweep_config.hydra.job) as job:
            job.id = submitit.JobEnvironment().job_id
            sweep_config.hydra.job.num = job_num
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        print(f"flashlight: job on GPU {gpu}: {pool.job_cpu_report()}", flush=True)  # what it got, seen from inside
        with GpuLock(gpu, self.params.get("lock_dir")):  # never beside another job on this GPU
            return run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                           config=sweep_config, job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")

    # ------------------------------------------------------------------ in the launching process
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit
        from submitit.local.local import LocalExecutor, LocalJob, start_controller

        from flashlight.harness import gpus as pool

        p = self.params
        gpus = pool.visible_gpus(p.get("gpus"))

        class OneGpuExecutor(LocalExecutor):
            """submitit's local executor, but CUDA_VISIBLE_DEVICES is the GPU given, not 0..n-1, and the job's
            process starts with the environment job_env added and on the CPUs cpus (None: any): start_controller
            copies os.environ into the process it starts, which inherits the starting thread's affinity too."""

            def _submit_command(self, command: str) -> LocalJob:
                with pool.started_with(self.parameters.get("job_env") or {}, self.parameters.get("cpus")):
                    proc = start_controller(folder=self.folder, command=command, tasks_per_node=1,
                                            cuda_devices=self.parameters["cuda_devices"],
                                            timeout_min=self.parameters.get("timeout_min", 60),
                                            signal_delay_s=self.parameters.get("signal_delay_s", 30),
                                            stderr_to_stdout=self.parameters.get("stderr_to_stdout", False),
                                            setup=self.parameters.get("setup") or ())
                return LocalJob(folder=self.folder, job_id=str(proc.pid), process=proc, tasks=[0])

        executor = OneGpuExecutor(folder=p["submitit_folder"], max_num_timeout=0)
        executor.update_parameters(timeout_min=p.get("timeout_min", 120), signal_delay_s=p.get("signal_delay_s", 30),
                                   stderr_to_stdout=bool(p.get("stderr_to_stdout")), setup=p.get("setup") or [])
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"GPUs of this host: {len(job_overrides)} job(s) on {len(gpus)} GPU(s) {','.join(gpus)}, "
                 f"one job per GPU at a time, the longest expected first; sweep output dir: {sweep_dir}")
        # each job's share of the CPUs: the jobs at once (the queue fills gpus in order, so only the first
        # at_once of them ever run one) split the CPUs this launcher may use
        cpus, at_once = pool.usable_cpus(), max(1, min(len(gpus), len(job_overrides)))
        share = pool.cpu_share(p.get("cpus_per_job", "auto"), at_once, len(cpus))
        job_env = pool.job_cpu_env(share)
        pin = bool(p.get("pin_cpus", True))
        slices = pool.cpu_slices(gpus[:at_once], share, cpus) if pin else {}
        log.info(self._share_text(share, job_env, slices, cpus, at_once, pin))
        history_path = pool.history_path()
        history, earlier = pool.read_history(history_path), pool.read_job_log(sweep_dir / "gpu_jobs.csv")
        items, recorded = [], []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            items.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
            key = pool.job_key(filter_overrides(overrides))
            recorded.append(history.get(key, []) + earlier.get(key, []))
        # estimates (a config composed per job, ~50 ms each) only where some job has no recorded run
        estimates = [None] * len(items) if all(recorded) else [self._estimate(o) for o in job_overrides]
        expected = pool.expected_seconds(recorded, estimates)
        for (overrides, _, idx, _, _), (seconds, source) in zip(items, expected):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} (expected {seconds:.1f} s, {source})")

        def submit(item, gpu):
            executor.update_parameters(cuda_devices=gpu, job_env=job_env, cpus=slices.get(gpu))
            job = executor.submit(self, *item)
            job._results_timeout_s = 0  # local files: a job that ended without its result never writes it
            given = "".join(f", {k}={v}" for k, v in job_env.items())
            if gpu in slices:
                given += f", CPUs {pool.cpu_list_text(slices[gpu])}"
            log.info(f"\t#{item[2]} started on GPU {gpu} (submitit job {job.job_id}{given})")
            return job

        def finished(r):  # its outcome now, and a completed job's duration into the history for the next sweep
            job, overrides = r["job"], filter_overrides(r["item"][0])
            try:
                r["return"], r["state"] = job.results()[0], "COMPLETED"
            except Exception as e:  # failed, killed, timed out: reported below, the others' results kept
                r["return"], r["state"] = None, f"{job.state}: {type(e).__name__}"
                r["error"] = " ".join(str(e).split())[-600:]
                return
            pool.record_history(history_path, pool.job_key(overrides), r["end"] - r["start"])

        t0 = time.time()
        done = pool.run_queue(items, gpus, submit, poll_s=float(p.get("poll_s", 0.2)),
                              log=lambda m: log.info("\t" + m), name=lambda i, item: str(item[2]),
                              expected=[seconds for seconds, _ in expected], on_done=finished)
        returns, failed, records = [], [], []
        for r in done:
            job, idx = r["job"], r["item"][2]
            if r["state"] == "COMPLETED":
                returns.append(r["return"])
            else:
                failed.append(f"#{idx} ({' '.join(filter_overrides(r['item'][0]))}) on GPU {r['gpu']}: {r['state']}: "
                              f"{r['error']} (log: {job.paths.stderr})")
            records.append({"job": idx, "gpu": r["gpu"], "start": f"{r['start']:.3f}", "end": f"{r['end']:.3f}",
                            "seconds": f"{r['end'] - r['start']:.2f}", "state": r["state"],
                            "overrides": " ".join(filter_overrides(r["item"][0])),
                            "expected_s": f"{r['expected']:.1f}", "cpus": "" if share is None else share})
        pool.write_job_log(sweep_dir / "gpu_jobs.csv", records)
        log.info(f"{len(done)} job(s) on {len(gpus)} GPU(s) in {time.time() - t0:.1f} s "
                 f"({sweep_dir / 'gpu_jobs.csv'})")
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(done)} job(s) did not finish (the others did; running the "
                               "same command again measures only what is missing):\n  " + "\n  ".join(failed))
        return returns

    @staticmethod
    def _share_text(share, job_env, slices, cpus, at_once, pin) -> str:
        if share is None:
            return "CPU share: off (cpus_per_job); the jobs inherit this environment and CPUs as they are"
        from flashlight.harness import gpus as pool

        text = f"CPU share: {share} per job ({len(cpus)} usable CPU(s), {at_once} job(s) at once)"
        kept = [f"{v}={os.environ[v]}" for v in pool.CPU_SHARE_VARS if v not in job_env]
        text += ", " + (" ".join(f"{k}={v}" for k, v in job_env.items()) or "no thread count")
        text += " set in each job's environment" + (f" ({' '.join(kept)} kept as set)" if kept else "")
        if slices:
            return text + "; each job pinned to its GPU's CPUs: " + ", ".join(
                f"GPU {g}: {pool.cpu_list_text(c)}" for g, c in slices.items())
        why = ("pin_cpus: false" if not pin else f"{share} × {at_once} > {len(cpus)} CPUs"
               if share * at_once > len(cpus) else "this platform cannot pin")
        return text + f"; not pinned ({why})"

    def _estimate(self, overrides: Sequence[str]) -> Optional[float]:
        """The job's rough duration from its config as the job will compose it (flashlight.harness.gpus.
        estimate_seconds); None where it cannot be made (an unknown variant: the job will say why)."""
        from flashlight.harness import gpus as pool

        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            tune = cfg.get("tune")
            return pool.estimate_seconds({
                "variant": cfg.variant.name, "backends": OmegaConf.to_container(cfg.backends)
                if OmegaConf.is_config(cfg.backends) else cfg.backends, "mode": cfg.mode.name,
                "shape": OmegaConf.to_container(cfg.shape, resolve=True),
                "tune": OmegaConf.to_container(tune, resolve=True) if OmegaConf.is_config(tune) else {}})
        except Exception as e:
            log.debug(f"no estimate for {' '.join(overrides)}: {type(e).__name__}: {e}")
            return None
