"""Autotuning: Optuna studies over the tile configs of the fused kernels, stored and looked up.

    results = flashlight.tune.tune(attn, q, k, v, n_trials=30)   # tunes every fused region of attn
    fast = flashlight.compile(attn)                              # its launches use the best stored configs

One study per kernel and machine. Its name (study_key) joins the kernel's hash, shape bucket, dtype,
GPU name and torch/triton versions, so a stored result is used only where it was measured. Studies
live in Optuna storage: by default an SQLite file in the user cache dir; any Optuna storage URL
(PostgreSQL for many workers), ``journal:///path/file.log`` (a journal file, for shared filesystems)
or an Optuna storage object also work. A second run resumes its study; workers sharing a storage
share the study (Optuna hands out the trials, so none is lost or counted twice).

One trial: a config from the kernel's search space; rejected up front if it breaks the generator's
tile bound or the estimated shared memory/registers of the GPU; run on fresh random inputs; its
output checked against the default config's; timed (median of triton.testing.do_bench on a GPU, of a
few calls in the CPU interpreter, where the times mean nothing). A config that fails any step is a
pruned trial with the reason in user_attrs["failure"], and the study goes on. The default config is
enqueued first, so the best found is never worse than untuned.

At compile time the runtime asks best_config() for a stored best config (cached per process; this
module registers it with the runtime, and importing flashlight imports this module); it
never tunes, and a missing or unreadable storage just means the default config.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.fx as fx

from flashlight.compiler import runtime
from flashlight.compiler.backend import fuse
from flashlight.compiler.codegen import MAX_BLOCK, KernelSource
from flashlight.compiler.runtime import CompiledRegion, default_config, interpreting

MIN_BLOCK = 16             # tl.dot needs at least 16 along each tile dimension
MAX_REGS_PER_THREAD = 255  # NVIDIA's limit; above it registers spill to local memory
JOURNAL_PREFIX = "journal://"

_TUNED: dict = {}        # study key -> best config tuned in this process
_LOOKED_UP: dict = {}    # (storage url, study key) -> stored best config or None
_STORAGES: dict = {}     # (url, sqlite wait) -> Optuna storage object (one engine each per process)
_lookup_storage: str | None = None
_warned: set = set()


# ------------------------------------------------------------------------------------------ storage
def default_storage_url() -> str:
    """SQLite in the cache dir (FLASHLIGHT_CACHE_DIR or ~/.cache/flashlight, beside the kernels)."""
    return f"sqlite:///{runtime.cache_dir().parent / 'tune.db'}"


def open_storage(storage=None, sqlite_wait_s: float = 30):
    """An Optuna storage from None (the default SQLite file), a URL, journal:///path, or a storage object.

    sqlite_wait_s: how long SQLite waits for another process's write before "database is locked"."""
    import optuna

    if storage is None:
        storage = default_storage_url()
    if not isinstance(storage, str):
        return storage
    key = (storage, sqlite_wait_s)
    if key not in _STORAGES:
        if storage.startswith(JOURNAL_PREFIX):
            path = Path(storage[len(JOURNAL_PREFIX):])  # journal:///abs/file.log, journal://rel/file.log
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            _STORAGES[key] = optuna.storages.JournalStorage(backend)
        elif storage.startswith("sqlite:"):
            _STORAGES[key] = _shared_rdb(storage, engine_kwargs={"connect_args": {"timeout": sqlite_wait_s}})
        else:
            _STORAGES[key] = _shared_rdb(storage)
    return _STORAGES[key]


def _shared_rdb(url: str, attempts: int = 8, **kwargs):
    """RDBStorage that several workers may reach first at once: on a fresh database they all create
    Optuna's tables; PostgreSQL lets one win and fails the others (duplicate key in pg_type), SQLite
    fails them with "table ... already exists" (one tuning worker per GPU of a host on one file). A retry
    then finds the tables there."""
    import sqlalchemy.exc
    import optuna

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as e:
            if attempt == attempts - 1 or (isinstance(e, sqlalchemy.exc.OperationalError)
                                           and "already exists" not in str(e)):
                raise
            time.sleep(0.2 * (attempt + 1))


def set_storage(storage: str | None) -> None:
    """Where compile-time lookups read in this process (default: FLASHLIGHT_TUNE_STORAGE, else the SQLite file)."""
    global _lookup_storage
    _lookup_storage = storage
    _LOOKED_UP.clear()


# ------------------------------------------------------------------------------------------ keys
def device_name(device: torch.device) -> str:
    if device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_name(device)
    return "cpu-interpreter"


def shape_bucket(ks: KernelSource) -> str:
    """Kernels are generated for one static shape (sizes are constants in the source), so the bucket
    is that shape: batch programs and the sizes of the query, key, value and contraction axes."""
    dims = "-".join(f"{a}{s}" for a, s in sorted(ks.sizes.items()) if not a.startswith("b"))
    return f"batch{ks.batch}-{dims}"


def study_key(ks: KernelSource, device: torch.device) -> str:
    import triton

    dtype = str(ks.out_dtype).replace("torch.", "")
    return (f"{ks.name}|{shape_bucket(ks)}|{dtype}|{device_name(device)}"
            f"|torch-{torch.__version__}|triton-{triton.__version__}")


# ------------------------------------------------------------------------------------------ space
def _tile(size: int) -> int:
    """The power-of-two tile the generator uses for a head dim (codegen: at least 16)."""
    return 1 << max(4, (size - 1).bit_length())


KNOBS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def complete_config(cfg: dict) -> dict:
    """A config with every knob set (the runtime's own fallbacks for those left out), in one key order."""
    full = {"num_warps": 4, "num_stages": 2, **cfg}
    return {k: int(full[k]) for k in (*KNOBS, *sorted(set(full) - set(KNOBS))) if k in full}


def search_space(ks: KernelSource, device: torch.device) -> dict:
    """The knobs of this kernel and the values to try; check_config judges each combination."""
    if device.type == "cuda" and not interpreting():
        space = {"BLOCK_M": [32, 64, 128], "BLOCK_N": [32, 64, 128], "num_warps": [4, 8], "num_stages": [2, 3, 4]}
        if ks.cuda_core_dots:   # float32 tiles on the CUDA cores (runtime.CUDA_CORE_TILES): smaller ones
            space = {"BLOCK_M": [16, 32, 64], "BLOCK_N": [16, 32, 64], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]}
    else:  # the interpreter: a tiny space (warps and stages mean nothing there)
        space = {"BLOCK_M": [16, 32], "BLOCK_N": [16, 32], "num_warps": [4], "num_stages": [1]}
    # no tile wider than the problem
    space["BLOCK_M"] = [b for b in space["BLOCK_M"] if b <= max(MIN_BLOCK, _tile(ks.M))]
    space["BLOCK_N"] = [b for b in space["BLOCK_N"] if b <= max(MIN_BLOCK, _tile(ks.sizes["n"]))]
    for k, v in complete_config(default_config(ks, device.type)).items():  # the default seeds every study
        if v not in space[k]:
            space[k] = sorted(space[k] + [v])
    return space


def estimate_resources(ks: KernelSource, cfg: dict) -> tuple[int, int]:
    """Rough shared memory (bytes) and 32-bit registers per thread of one program.

    Shared memory: K and V tiles buffered num_stages deep, plus the resident Q tile. Registers: the
    fp32 ·V accumulators, the fp32 score tile and the Q tile, spread over the threads. An estimate to
    skip hopeless configs without compiling them; the compiler's own limits still apply."""
    cfg = complete_config(cfg)
    elt = ks.out_dtype.itemsize
    d = sum(_tile(s) for a, s in ks.sizes.items() if a.startswith("d"))  # Q·Kᵀ contraction widths
    e = _tile(ks.sizes["e"])
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    smem = cfg["num_stages"] * bn * (d + e) * elt + bm * d * elt
    regs = (bm * ks.n_dot * e + bm * bn + bm * d * elt // 4) // (32 * cfg["num_warps"])
    return smem, regs


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on this GPU (what Triton checks against)."""
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"])
    except Exception:
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


def check_config(ks: KernelSource, cfg: dict, device: torch.device, smem_limit: int | None = None) -> str | None:
    """Why this config cannot work for this kernel on this device, or None if it may."""
    missing = {"BLOCK_M", "BLOCK_N"} - set(cfg)
    if missing:
        return f"config {cfg} lacks {sorted(missing)}"
    cfg = complete_config(cfg)
    for k in ("BLOCK_M", "BLOCK_N"):
        b = cfg[k]
        if b < MIN_BLOCK or b & (b - 1):
            return f"{k}={b}: tiles are powers of two, at least {MIN_BLOCK}"
        if b > MAX_BLOCK:
            return (f"{k}={b} exceeds the generator's tile bound {MAX_BLOCK} (shapes divisible by it "
                    "are compiled without bounds masks)")
    w = cfg["num_warps"]
    if w < 1 or w & (w - 1) or w > 16:
        return f"num_warps={w}: a power of two from 1 to 16"
    if cfg["num_stages"] < 1:
        return f"num_stages={cfg['num_stages']}: at least 1"
    if device.type == "cuda" and not interpreting():
        smem, regs = estimate_resources(ks, cfg)
        limit = smem_limit or shared_memory_limit(device)
        if smem > limit:
            return f"resources: ~{smem // 1024} KiB shared memory estimated, {limit // 1024} KiB on this GPU"
        if regs > MAX_REGS_PER_THREAD:
            return f"resources: ~{regs} registers per thread estimated, at most {MAX_REGS_PER_THREAD}"
    return None


def legal_configs(ks: KernelSource, device: torch.device) -> list[dict]:
    """Every combination of the search space that check_config lets through."""
    space = search_space(ks, device)
    combos = (dict(zip(space, values)) for values in itertools.product(*space.values()))
    return [c for c in combos if check_config(ks, c, device) is None]


# ------------------------------------------------------------------------------------------ measuring
def fresh_inputs(inputs: list, seed: int = 0) -> list:
    """Random values in the same layouts (strides, offsets, broadcasts). Integer and bool inputs
    (ids, masks) and non-finite entries (-inf masks) are kept: they decide which tiles are skipped."""
    out = []
    for i, t in enumerate(inputs):
        if not t.is_floating_point():
            out.append(t)
            continue
        n = t.untyped_storage().nbytes() // t.element_size()
        base = t.new_empty(0).set_(t.untyped_storage(), 0, (n,), (1,))
        g = torch.Generator(device=t.device).manual_seed(seed * 1000 + i)
        rand = torch.randn(n, generator=g, device=t.device, dtype=torch.float32).to(t.dtype)
        out.append(torch.where(torch.isfinite(base), rand, base).as_strided(t.shape, t.stride(), t.storage_offset()))
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖; NaN where the reference has none (or the reverse) is infinitely wrong."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape or not torch.equal(torch.isnan(out), torch.isnan(ref)):
        return math.inf
    out, ref = torch.nan_to_num(out), torch.nan_to_num(ref)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """How far a config's output may be from the default config's (two roundings of one result)."""
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2
    return 2e-3 if device.type == "cuda" and not interpreting() else 1e-4


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def launch(region: CompiledRegion, inputs: list) -> torch.Tensor:
    """One launch of a region with its own (explicit) config; tests replace this to inject failures."""
    return region(inputs)


def time_launch(region: CompiledRegion, inputs: list, rep_ms: int = 25) -> float:
    """Median ms of one launch: triton.testing.do_bench on a GPU, a few timed calls in the interpreter."""
    device = inputs[0].device
    if device.type == "cuda" and not interpreting():
        import triton.testing

        return float(triton.testing.do_bench(lambda: launch(region, inputs), warmup=max(1, rep_ms // 4),
                                             rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        launch(region, inputs)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _failure(e: Exception) -> str:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    kind = "resources" if isinstance(e, OutOfResources) else \
        "compile" if isinstance(e, (CompilationError, PTXASError)) else "error"
    return f"{kind}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"


# ------------------------------------------------------------------------------------------ studies
@dataclasses.dataclass
class TuneResult:
    kernel: str            # KernelSource.name
    key: str               # the study name
    study: object          # optuna.Study (all trials of every run so far)
    default_config: dict
    best_config: dict
    default_ms: float      # both timed now, side by side, on the same fresh inputs
    best_ms: float

    @property
    def speedup(self) -> float:
        return self.default_ms / self.best_ms

    def counts(self) -> dict:
        states = [t.state.name for t in self.study.trials]
        return {s.lower(): states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")} | {"trials": len(states)}

    def __str__(self):
        c = self.counts()
        return (f"{self.kernel}: default {_fmt(self.default_config)} {self.default_ms:.3f} ms → best "
                f"{_fmt(self.best_config)} {self.best_ms:.3f} ms ({self.speedup:.2f}×; {c['trials']} trials "
                f"in the study, {c['pruned']} pruned)")


def _fmt(cfg: dict) -> str:
    return "/".join(str(cfg[k]) for k in KNOBS if k in cfg)


@dataclasses.dataclass
class _Objective:
    ks: KernelSource
    inputs: list
    ref: torch.Tensor
    default: dict
    space: dict
    device: torch.device
    tol: float
    rep_ms: int
    trial_timeout: float
    calls: int = 0   # trials this worker started (see _optimize)

    def config(self, trial) -> dict:
        given = trial.user_attrs.get("config")  # enqueued by tune_region(extra_configs=...)
        if given is not None and any(given.get(k) not in v for k, v in self.space.items()):
            return complete_config(given)  # outside the declared space: run as given, no suggestion
        return {name: trial.suggest_categorical(name, choices) for name, choices in self.space.items()}

    def __call__(self, trial) -> float:
        import optuna

        self.calls += 1
        cfg = self.config(trial)
        trial.set_user_attr("config", cfg)
        earlier = _same_config(trial.study, cfg)
        if earlier is not None:  # measured before: the sampler proposed it again, reuse the result
            trial.set_user_attr("repeat_of", earlier.number)
            if earlier.state == optuna.trial.TrialState.COMPLETE:
                return earlier.value
            self.fail(trial, earlier.user_attrs.get("failure", "failed before"))
        # the default is known to work: never judged by the estimate, only by running it
        reason = check_config(self.ks, cfg, self.device) if cfg != self.default else None
        if reason:
            self.fail(trial, reason)
        region = CompiledRegion(self.ks, cfg)
        t0 = time.perf_counter()
        try:
            out = launch(region, self.inputs)  # compiles
            _sync(self.device)
        except Exception as e:
            self.fail(trial, _failure(e))
        first_s = time.perf_counter() - t0
        if first_s > self.trial_timeout:
            self.fail(trial, f"timeout: compile and first call took {first_s:.1f} s > {self.trial_timeout:g} s")
        err = rel_err(out, self.ref)
        trial.set_user_attr("rel_err", err if math.isfinite(err) else str(err))
        if not err <= self.tol:
            self.fail(trial, f"wrong result: rel err {err:.3g} against the default config > {self.tol:g}")
        try:
            return time_launch(region, self.inputs, self.rep_ms)
        except Exception as e:
            self.fail(trial, _failure(e))

    @staticmethod
    def fail(trial, reason: str):
        import optuna

        trial.set_user_attr("failure", reason)
        raise optuna.TrialPruned(reason)


def _optimize(study, objective: _Objective, n_trials: int, timeout: float | None) -> None:
    """study.optimize for n_trials of this worker's own. Workers sharing an SQLite study can both take the
    same enqueued trial (SQLite has no row locks; optuna issue 4621): the second to finish it is refused
    ("Cannot tell a COMPLETE trial"). Its result is the first's; that trial is not counted as this worker's,
    which goes on with the rest of its trials."""
    deadline = None if timeout is None else time.monotonic() + timeout
    done = refused = 0
    while done < n_trials:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        before = objective.calls
        try:
            study.optimize(objective, n_trials=n_trials - done, timeout=left)
            return
        except ValueError as e:
            refused += 1
            if not str(e).startswith("Cannot tell a ") or refused > n_trials:
                raise
        done += objective.calls - before - 1   # the refused trial was another worker's


def _same_config(study, cfg):
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for t in study.get_trials(deepcopy=False, states=done):
        if t.user_attrs.get("config") == cfg:
            return t
    return None


def tune_region(ks: KernelSource, inputs: list, *, n_trials: int = 20, storage=None, timeout: float | None = None,
                trial_timeout: float = 120.0, rep_ms: int = 25, seed: int | None = None,
                extra_configs=()) -> TuneResult:
    """Add n_trials trials to the study of this kernel (created or resumed), on fresh inputs shaped like
    `inputs`; return the study's best config, timed against the default side by side."""
    import optuna

    device = inputs[0].device
    key = study_key(ks, device)
    inputs = fresh_inputs(inputs)
    default = complete_config(default_config(ks, device.type))
    try:
        ref = launch(CompiledRegion(ks, default), inputs)
    except Exception as e:
        raise RuntimeError(f"{ks.name}: the default config {default} fails ({_failure(e)}); there is "
                           "nothing to check the other configs against") from e
    space = search_space(ks, device)
    # a small discrete space: a few random trials teach TPE enough (its default is 10)
    sampler = optuna.samplers.TPESampler(n_startup_trials=max(3, min(10, n_trials // 3)), seed=seed)
    study = optuna.create_study(study_name=key, storage=open_storage(storage), direction="minimize",
                                load_if_exists=True, sampler=sampler)
    if "kernel" not in study.user_attrs:
        for name, value in (("kernel", ks.name), ("shape", shape_bucket(ks)), ("default_config", default),
                            ("search_space", space)):
            study.set_user_attr(name, value)
    # the known-good default first, then any given configs (each once per study)
    for cfg in [default, *map(complete_config, extra_configs)]:
        study.enqueue_trial(cfg, user_attrs={"config": cfg}, skip_if_exists=True)
    objective = _Objective(ks, inputs, ref, default, space, device, tolerance(ks.out_dtype, device), rep_ms,
                           trial_timeout)
    _optimize(study, objective, n_trials, timeout)
    try:
        best = study.best_trial.user_attrs["config"]
    except ValueError:
        failures = sorted({t.user_attrs.get("failure", "") for t in study.trials})
        raise RuntimeError(f"{ks.name}: no config ran correctly in study {key!r}: {failures}") from None
    default_ms = time_launch(CompiledRegion(ks, default), inputs, rep_ms)
    best_ms = default_ms if best == default else time_launch(CompiledRegion(ks, best), inputs, rep_ms)
    _TUNED[key] = best
    runtime.tuned_generation += 1  # compiled regions look up their config again
    return TuneResult(ks.name, key, study, default, best, default_ms, best_ms)


# ------------------------------------------------------------------------------------------ regions of fn
class _Recorder(fx.Interpreter):
    """Runs the fused graph and notes each fused region with the tensors it is launched on."""

    def __init__(self, gm, found):
        super().__init__(gm)
        self.found = found

    def call_function(self, target, args, kwargs):
        if target is torch.ops.flashlight.fused_attention.default:
            region = runtime.lookup(args[1])
            self.found.setdefault(region.ks.name, (region, list(args[0])))
        return super().call_function(target, args, kwargs)


def fused_regions(fn, *args, **kwargs) -> list:
    """[(CompiledRegion, its input tensors)] for each region flashlight fuses in fn(*args, **kwargs).

    fn is compiled exactly as flashlight.compile does it (the same kernels, hence the same study keys)
    and run once, without gradients (the fused kernels are forward only). torch.compile's caches are
    reset first (torch.compiler.reset), so that fn is captured afresh however often it was compiled."""
    found: dict = {}

    def backend(gm, example_inputs):
        fused_gm, _, _ = fuse(gm, example_inputs)
        return lambda *xs: _Recorder(fused_gm, found).run(*xs)

    torch.compiler.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, dynamic=False)(*args, **kwargs)
    return list(found.values())


def tune(fn, *args, n_trials: int = 20, storage=None, timeout: float | None = None, trial_timeout: float = 120.0,
         rep_ms: int = 25, seed: int | None = None, extra_configs=(), **kwargs) -> list[TuneResult]:
    """Tune every fused region of fn(*args, **kwargs): n_trials more trials per region's study.

    storage: None (SQLite in the cache dir), an Optuna URL, journal:///path/file.log, or a storage.
    timeout: seconds per study (Optuna's). trial_timeout: seconds for one config's compile and first
    call (checked after the call: a hung kernel cannot be interrupted). rep_ms: do_bench rep per trial.
    seed: the sampler's (workers sharing a study should not share one). extra_configs: more configs
    to try first. Other keyword arguments go to fn. Compiled regions use the best configs from now on.
    """
    regions = fused_regions(fn, *args, **kwargs)
    if not regions:
        name = getattr(fn, "__name__", "fn")
        raise ValueError(f"{name}: no fused attention region on these inputs, nothing to tune "
                         f"(flashlight.explain({name}, ...) says why)")
    return [tune_region(region.ks, inputs, n_trials=n_trials, storage=storage, timeout=timeout,
                        trial_timeout=trial_timeout, rep_ms=rep_ms, seed=seed, extra_configs=extra_configs)
            for region, inputs in regions]


# ------------------------------------------------------------------------------------------ lookup
def best_config(ks: KernelSource, device: torch.device) -> dict | None:
    """The best config stored for this kernel on this device, or None. Never tunes, never raises."""
    key = url = None
    try:
        key = study_key(ks, device)
        if key in _TUNED:
            return _TUNED[key]
        url = _lookup_storage or os.environ.get("FLASHLIGHT_TUNE_STORAGE") or default_storage_url()
        if _missing_file(url):  # nothing tuned there yet: create nothing, import nothing
            return None
        if (url, key) not in _LOOKED_UP:
            _LOOKED_UP[(url, key)] = _stored_best(url, key)
        return _LOOKED_UP[(url, key)]
    except Exception as e:  # a broken storage must never break a launch
        if url not in _warned:
            _warned.add(url)
            why = (str(e).splitlines() or [""])[0][:200]
            warnings.warn(f"flashlight: cannot read tuned configs from {url} ({type(e).__name__}: {why}); "
                          "using the default config", stacklevel=2)
        if key is not None:
            _LOOKED_UP[(url, key)] = None
        return None


runtime.register_tuned_lookup(best_config)  # the runtime asks it; it imports nothing of this module


def _missing_file(url) -> bool:
    """A file storage (SQLite, journal) whose file does not exist."""
    for prefix in ("sqlite:///", JOURNAL_PREFIX):
        if isinstance(url, str) and url.startswith(prefix):
            return not Path(url[len(prefix):].split("?")[0]).exists()
    return False


def _stored_best(url: str, key: str) -> dict | None:
    storage = open_storage(url, sqlite_wait_s=2)  # a launch does not wait long for a busy file
    try:
        study_id = storage.get_study_id_from_name(key)
    except KeyError:
        return None
    try:
        return dict(storage.get_best_trial(study_id).user_attrs["config"])
    except ValueError:  # no complete trial yet
        return None


# ------------------------------------------------------------------------------------------ reporting
def save_report(result: TuneResult, out_dir) -> list[Path]:
    """The study's trial table and Optuna's pictures (history; parameter importances where several
    knobs vary among the complete trials) under out_dir, named after the kernel."""
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = result.study
    written = [out / f"{result.kernel}-trials.csv"]
    study.trials_dataframe().to_csv(written[0], index=False)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varied = [k for k in search_space_of(study) if len({t.params.get(k) for t in complete}) > 1]
    plots = [("history", functools.partial(ovm.plot_optimization_history, study, target_name="ms"))]
    if len(complete) >= 3 and len(varied) >= 2:
        plots.append(("importances", functools.partial(ovm.plot_param_importances, study, params=varied,
                                                       target_name="ms")))
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = plot()
            except Exception as e:  # a picture is a report, not a reason to lose the others
                warnings.warn(f"flashlight: {name} plot of {result.kernel} failed: {e}")
                continue
        ax.figure.suptitle(f"{result.kernel} ({study.user_attrs.get('shape', '')})", fontsize=8, y=1.0)
        path = out / f"{result.kernel}-{name}.png"
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        written.append(path)
    return written


def search_space_of(study) -> list[str]:
    return list(study.user_attrs.get("search_space", {}))


def summary(results: list[TuneResult]) -> list[dict]:
    """One plain row per tuned region (kernel, configs, times, trial counts)."""
    return [{"kernel": r.kernel, "default_config": json.dumps(r.default_config), "default_ms": r.default_ms,
             "best_config": json.dumps(r.best_config), "best_ms": r.best_ms, "speedup": r.speedup, **r.counts()}
            for r in results]
