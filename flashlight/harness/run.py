"""Benchmark/correctness runner: one variant, several backends, one tidy CSV.

    python -m flashlight.run variant=diff_attn                       # shape/dtype/device: auto
    python -m flashlight.run variant=causal shape=tiny backends=[eager,sdpa,flex]
    python -m flashlight.run -m variant=causal,alibi mode=fwd,fwdbwd  # Hydra multirun

Rows go to <hydra run dir>/results.csv as each case finishes; a summary table is printed at the end.
"""
from __future__ import annotations

import os
import shutil

# The fused kernels run on CPU only under the Triton interpreter, which must be chosen before
# triton is imported. Without a GPU driver we default to it (an explicit setting wins). Our own choice
# is marked: a Slurm job submitted from a GPU-less login node inherits this environment, and on a GPU
# node it must not run under the interpreter.
_AUTO_INTERPRET = "FLASHLIGHT_AUTO_INTERPRET"
if shutil.which("nvidia-smi") is None:
    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = os.environ[_AUTO_INTERPRET] = "1"
elif os.environ.pop(_AUTO_INTERPRET, None):
    os.environ.pop("TRITON_INTERPRET", None)

import dataclasses
import json
import math
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from flashlight.harness import variant_registry as registry
from flashlight.harness.variant_registry import Shape, Unsupported
from flashlight.results_schema import COLUMNS, tolerance

BACKENDS = ("eager", "compile", "sdpa", "flex", "flashlight")
COMPILED = {"compile", "flex", "flashlight"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
# forward+backward of attention = 3.5x the forward FLOPs: the backward does 5 matmuls to the forward's 2
# (2.5x the forward), plus the forward itself
FWDBWD_FLOP_FACTOR = 3.5


class ConfigError(Exception):
    pass


class NotFused(Exception):
    pass


@dataclasses.dataclass
class Plan:
    variant: registry.Variant
    shape: Shape
    backends: list[str]
    mode: str
    dtype: torch.dtype
    device: torch.device
    ref_dtype: torch.dtype
    tune: dict = dataclasses.field(default_factory=dict)  # cfg.tune (configs/tune/false.yaml)
    compile_mode: str = "default"  # torch.compile's mode for the compiled backends (compile, flex, flashlight)


# ------------------------------------------------------------------------------------------ config
def resolve(cfg: DictConfig) -> Plan:
    """Check the whole config before running anything; ConfigError lists what is known."""
    name = cfg.variant.name
    try:
        variant = registry.get(name)
    except registry.UnknownVariant as e:
        raise ConfigError(str(e)) from None
    backends = list(cfg.backends) if not isinstance(cfg.backends, str) else [cfg.backends]
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise ConfigError(f"unknown backend(s) {bad}; known backends: {', '.join(BACKENDS)}")
    mode = cfg.mode.name
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; known modes: {', '.join(MODES)}")

    device_s = cfg.device
    if device_s == "auto":
        device_s = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_s)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available")
    gpu = device.type == "cuda"

    dtype_s = cfg.dtype
    if dtype_s == "auto":
        dtype_s = "bfloat16" if gpu else "float32"
    if dtype_s not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype_s!r}; known: auto, {', '.join(DTYPES)}")

    sh = OmegaConf.to_container(cfg.shape, resolve=True)
    if sh.get("name") == "auto":
        preset = OmegaConf.load(Path(CONFIG_DIR) / "shape" / ("paper.yaml" if gpu else "tiny.yaml"))
        sh = {**OmegaConf.to_container(preset), **{k: v for k, v in sh.items() if v is not None and k != "name"}}
    missing = [k for k in ("B", "H", "Sq", "Sk", "D") if sh.get(k) is None]
    if missing:
        raise ConfigError(f"shape is missing {missing}")
    params = cfg.variant.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params else {}
    try:
        shape = variant.shape(sh["B"], sh["H"], sh["Sq"], sh["Sk"], sh["D"], sh.get("Dv"), **params)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    ref_s = cfg.get("reference_dtype", "auto")
    if ref_s == "auto":
        ref_dtype = torch.float64
        if gpu:  # the eager reference materialises a few score matrices
            n = getattr(shape, "N", 1) if isinstance(getattr(shape, "N", 1), int) else 1
            need = 4 * 8 * shape.B * shape.H * shape.Sq * shape.Sk * n
            if need > 0.5 * torch.cuda.get_device_properties(device).total_memory:
                ref_dtype = torch.float32
    else:
        ref_dtype = DTYPES[ref_s]
    tune = OmegaConf.to_container(cfg.tune, resolve=True) if cfg.get("tune") else {}
    if tune.get("enabled") and tune.get("config"):
        raise ConfigError("tune=true searches for a tile config and tune.config sets one: drop one of them")
    compile_mode = cfg.get("compile_mode") or "default"
    if compile_mode not in COMPILE_MODES:
        raise ConfigError(f"unknown compile_mode {compile_mode!r}; known: {', '.join(COMPILE_MODES)}")
    return Plan(variant, shape, backends, mode, DTYPES[dtype_s], device, ref_dtype, tune, compile_mode)


def backend_label(backend: str, plan: Plan) -> str:
    """The row's backend: its name, and the compile mode where it is not the default (`flashlight
    (reduce-overhead)`), so that rows of two modes are two cases in results, resume and reports."""
    if backend in COMPILED and plan.compile_mode != "default":
        return f"{backend} ({plan.compile_mode})"
    return backend


# ------------------------------------------------------------------------------------------ cases
def dtype_floor(v, shape, inputs, refs, grad_out) -> list | None:
    """The errors of the variant's own code run eagerly in the inputs' dtype, against the same reference
    (output, then each gradient): what the dtype alone costs any implementation. A gradient summed over
    many terms that nearly cancel (differential attention's λ in bfloat16) is far from its float64 value
    whoever computes it. None where eager cannot run (out of memory at a huge shape): the row is then
    judged by the tolerance alone."""
    try:
        x = {k: (t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t) for k, t in inputs.items()}
        with torch.set_grad_enabled(grad_out is not None):
            out = v.bind(shape)(**x)
            outs = [out]
            if grad_out is not None:
                outs += list(torch.autograd.grad(out, [x[n] for n in v.learnable], grad_out))
        return [rel_err(o, r) for o, r in zip(outs, refs)]
    except Exception:   # noqa: BLE001 (a floor that cannot be had leaves the verdict to the tolerance)
        return None


def judge(errs, names, floor, dtype, device) -> tuple[bool, str]:
    """(wrong, why): wrong where an error is above the tolerance and above twice eager's in the same dtype
    (the floor); why names those errors, or else the ones the floor admitted."""
    tol = tolerance(dtype, device)
    admitted, bad = [], []
    for i, (name, e) in enumerate(zip(names, errs)):
        if e <= tol:
            continue
        if floor is not None and e <= 2 * floor[i]:
            admitted.append(f"{name} rel err {e:.3g} > tol {tol:g}, within 2x eager {str(dtype)[6:]}'s {floor[i]:.3g}")
        else:
            bad.append(f"{name} rel err {e:.3g} > tol {tol:g}" +
                       (f" and > 2x eager {str(dtype)[6:]}'s {floor[i]:.3g}" if floor is not None else ""))
    return (True, "; ".join(bad)) if bad else (False, "; ".join(admitted))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if out.shape != ref.shape:
        return math.inf
    if torch.isnan(out).ne(torch.isnan(ref)).any():
        return math.nan
    out, ref = torch.nan_to_num(out), torch.nan_to_num(ref)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_memory_mb(step, given, device) -> float:
    """What one call needs at its peak: the most it allocates above what was allocated before it, plus the
    tensors it is given (`given`: the inputs, a baseline's prepared mask). Measured on a call of its own:
    unlike peak_mem_mb (the most the process held during the timed calls), nothing else the process holds
    counts (the references, what earlier cases left, the benchmark's cache-flush buffer)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return round((peak + tensor_bytes(given)) / 2**20, 1)


def tensor_bytes(obj) -> int:
    """Bytes of the distinct storages of the tensors in obj: nested dicts, lists and tuples, and objects
    that give their tensors as a tuple (FlexAttention's BlockMask, as_tuple())."""
    storages, stack = {}, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storages[(x.device, x.untyped_storage().data_ptr())] = x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            stack += list(x.values())
        elif isinstance(x, (list, tuple)):
            stack += list(x)
        elif callable(getattr(x, "as_tuple", None)):
            stack += list(x.as_tuple())
    return sum(storages.values())


def _bench(step, plan: Plan, cfg, what: str = "run") -> float:
    """Median ms of step(). ``what`` names what is timed (run: the call, the ``ms`` column; prep: a
    backend's one-off preparation, ``prep_ms``; per_batch: preparation + call with the mask inputs new
    every call, ``per_batch_ms``), for tests that check what each timing contains."""
    if plan.device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, rep=cfg.timing.rep_ms, return_mode="median"))
    for _ in range(cfg.timing.warmup):
        step()
    times = []
    for _ in range(cfg.timing.repeat):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class FallbackWatch:
    """Catch torch.compile(flex_attention) silently running the unfused eager path (MEASURE.md trap)."""

    def __init__(self):
        self.fell_back = False

    def __enter__(self):
        try:  # the eager-path warning is shown once per process; re-arm it for this case
            import torch.nn.attention.flex_attention as fa

            fa._WARNINGS_SHOWN.clear()
        except (ImportError, AttributeError):
            pass
        self._cm = warnings.catch_warnings(record=True)
        self._log = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        for w in self._log:
            msg = str(w.message)
            if "without torch.compile" in msg or "unfused implementation" in msg:
                self.fell_back = True
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False


def make_fn(backend: str, plan: Plan, inputs: dict, info: dict):
    """(call, prepare): ``call(x, prep)`` runs the backend on the input dict x; ``prepare(x)`` is the one-off
    work a user of that backend does before the calls — FlexAttention's block masks, SDPA's materialised
    masks/biases — or None. The runner times prepare on its own (prep_ms), never inside the timed call."""
    v, shape = plan.variant, plan.shape
    bound = v.bind(shape)
    if backend == "eager":
        return (lambda x, prep: bound(**x)), None
    mode = None if plan.compile_mode == "default" else plan.compile_mode
    if backend == "compile":
        compiled = torch.compile(bound, mode=mode)
        return (lambda x, prep: compiled(**x)), None
    if backend == "sdpa":
        if v.sdpa_note:
            info["note"] = v.sdpa_note
        prepare = (lambda x: v.sdpa_prepare(x, shape)) if v.has_sdpa_prepare else None
        return (lambda x, prep: v.sdpa(x, shape, prep=prep)), prepare
    if backend == "flex":
        if not v.has_flex:
            raise Unsupported(f"{v.name}: no FlexAttention formulation")
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, mode=mode)
        prepare = (lambda x: v.flex_prepare(x, shape)) if v.has_flex_prepare else None
        return (lambda x, prep: v.flex(x, shape, attention=compiled, prep=prep)), prepare
    if backend == "flashlight":
        try:
            import flashlight
        except Exception as e:  # the compiler is optional for the other backends
            raise RuntimeError(f"import flashlight failed: {type(e).__name__}: {e}") from None
        report = flashlight.explain(bound, **inputs)
        info["fused"] = bool(report.fused)
        if not report.fused:
            reasons = [r.reason for r in getattr(report, "regions", []) if getattr(r, "reason", None)]
            lines = str(report).strip().splitlines()
            info["note"] = "; ".join(reasons) or (lines[0] if lines else "no region fused")
        info["counters"] = flashlight.counters
        from flashlight import tune
        from flashlight.compiler import runtime

        info["launch_configs"] = runtime.launch_configs
        if plan.tune.get("storage"):  # compile-time lookups of tuned configs read this storage
            tune.set_storage(plan.tune["storage"])
        # the fused kernels are what a row measures: not swapped for Inductor's code where that is faster
        fused = flashlight.compile(bound, config=plan.tune.get("config") or None, choose_faster=False, mode=mode)
        return (lambda x, prep: fused(**x)), None  # its data-mask classification: see per_batch_ms
    raise ConfigError(backend)


def _per_batch(call, prepare, inputs, mask_inputs, plan: Plan, cfg, info: dict, watch) -> tuple[float, bool]:
    """Median ms of preparation + call when the mask inputs (document ids) are new every call, as in training:
    two copies of them (other tensors, same values) alternate, so nothing prepared for one is reused for the
    next (FlexAttention's block mask, SDPA's mask, flashlight's tile classification, which is kept while the
    tensors it read are the same and unmodified). Also says whether flashlight classified during it."""
    batches = [inputs, {**inputs, **{n: inputs[n].clone() for n in mask_inputs}}]
    turn = [0]

    def batch_step():
        turn[0] ^= 1
        x = batches[turn[0]]
        return call(x, prepare(x) if prepare is not None else None)

    counters = info.get("counters")
    before = counters["classifications"] if counters is not None else 0
    with watch:
        ms = _bench(batch_step, plan, cfg, what="per_batch")
    return ms, counters is not None and counters["classifications"] > before


def _caused_by(e: BaseException, kind: type) -> bool:
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, kind):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def run_case(backend: str, plan: Plan, cfg, out_dir: Path | None = None) -> dict:
    v, shape, mode, dev = plan.variant, plan.shape, plan.mode, plan.device
    row = {"status": "ok", "reason": None, "ms": None, "tflops": None, "rel_err": None,
           "peak_mem_mb": None, "step_mem_mb": None, "compile_s": None, "prep_ms": None, "per_batch_ms": None}
    bwd = mode == "fwdbwd"
    info: dict = {}
    try:
        inputs = v.make_inputs(shape, plan.dtype, dev, requires_grad=bwd, seed=cfg.seed)
        wrt = [inputs[n] for n in v.learnable]

        # float64 (or fp32 for huge GPU shapes) reference from the same inputs
        ref_in = {k: (t.detach().to(plan.ref_dtype).requires_grad_(bwd) if t.is_floating_point() else t)
                  for k, t in inputs.items()}
        ref_out = v.bind(shape)(**ref_in)
        refs = [ref_out]
        if bwd:
            g = torch.Generator().manual_seed(cfg.seed + 12345)
            grad_out = torch.randn(ref_out.shape, generator=g, dtype=torch.float32)
            refs += list(torch.autograd.grad(ref_out, [ref_in[n] for n in v.learnable],
                                             grad_out.to(dev, plan.ref_dtype)))
            grad_out = grad_out.to(dev, plan.dtype)
        ref_out = ref_in = None

        if backend in COMPILED:
            torch._dynamo.reset()
        fn, prepare = make_fn(backend, plan, inputs, info)
        if backend == "flashlight" and plan.tune.get("enabled") and info.get("fused"):
            info["note"] = "; ".join(filter(None, [info.get("note"), tune_case(plan, inputs, out_dir)]))
        prep = None

        def call(x, p):
            out = fn(x, p)
            if bwd:
                return [out, *torch.autograd.grad(out, wrt, grad_out)]
            return [out]

        def step():  # the timed call: preparation is done (prep), as its users do it
            return call(inputs, prep)

        watch = FallbackWatch()
        with watch:
            t0 = time.perf_counter()
            launches0 = info["counters"]["fused_launches"] if "counters" in info else 0
            info.get("launch_configs", {}).clear()
            if prepare is not None:  # the first build (compile_s counts it), then the first call
                prep = prepare(inputs)
            outs = step()
            _sync(dev)
            first_s = time.perf_counter() - t0
            launched = (info["counters"]["fused_launches"] - launches0) if "counters" in info else None
        if info.get("launch_configs"):
            row["config"] = json.dumps(list(info["launch_configs"].values()))
        if backend in COMPILED:
            row["compile_s"] = round(first_s, 3)

        errs = [rel_err(o, r) for o, r in zip(outs, refs)]
        err = max(errs)
        row["rel_err"] = err
        if bwd:
            row["grad_rel_err"] = json.dumps({n: float(f"{e:.3g}") for n, e in zip(v.learnable, errs[1:])})
        outs = None

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with watch:
            ms = _bench(step, plan, cfg)
        if dev.type == "cuda":
            row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
            try:   # a measure of its own: what fails here leaves it empty, not the measured row an error
                row["step_mem_mb"] = step_memory_mb(step, (inputs, prep), dev)
            except Exception as e:
                warnings.warn(f"step_mem_mb not measured: {type(e).__name__}: {e}")
        row["ms"] = ms
        if prepare is not None:
            row["prep_ms"] = _bench(lambda: prepare(inputs), plan, cfg, what="prep")
        if v.mask_inputs:
            row["per_batch_ms"], derived_prep = _per_batch(call, prepare, inputs, v.mask_inputs, plan, cfg, info, watch)
            if prepare is None and derived_prep:  # flashlight: its data-mask classification, per_batch - ms
                row["prep_ms"] = max(0.0, row["per_batch_ms"] - ms)
        flops = v.flops(shape) * (FWDBWD_FLOP_FACTOR if bwd else 1.0)
        row["tflops"] = flops / (ms * 1e-3) / 1e12

        if watch.fell_back:
            row["status"], row["reason"] = "error", "flex_attention fell back to the unfused eager path"
        elif backend == "flashlight" and not info.get("fused"):
            row["status"], row["reason"] = "not_fused", info.get("note")
        elif backend == "flashlight" and not launched:
            row["status"], row["reason"] = "error", "explain reported a fused region but no fused kernel launched"
        elif not (err <= tolerance(plan.dtype, dev)):
            floor = dtype_floor(v, shape, inputs, refs, grad_out if bwd else None)
            wrong, why = judge(errs, ["out", *v.learnable] if bwd else ["out"], floor, plan.dtype, dev)
            if wrong:
                row["status"], row["reason"] = "wrong", why
            else:
                row["reason"] = "; ".join(filter(None, [info.get("note"), why]))
        elif info.get("note"):
            row["reason"] = info["note"]
    except Unsupported as e:
        row["status"], row["reason"] = "unsupported", str(e)
    except NotImplementedError as e:  # e.g. FlexAttention backward on CPU, a missing generated backward
        row["status"], row["reason"] = "unsupported", f"NotImplementedError: {' '.join(str(e).split())[:300]}"
    except torch.OutOfMemoryError as e:
        row["status"], row["reason"] = "oom", str(e).splitlines()[0][:300]
    except ConfigError:
        raise
    except Exception as e:  # a broken backend is a row, not the end of the run
        # a compiler's wrapped NotImplementedError (Inductor's lowering of flex_attention with return_lse on
        # CPU) is the backend saying it does not support the case, as a bare one is
        status = "unsupported" if _caused_by(e, NotImplementedError) else "error"
        row["status"], row["reason"] = status, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if os.environ.get("FLASHLIGHT_TRACEBACK"):
            traceback.print_exc()
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------ sweeps
# A case is one row: a re-launched run or sweep skips the cases whose row already exists (resume=true),
# and merged tables keep one row per case (the last one written: resume=false measures again).
CASE_KEY = ["variant", "backend", "mode", "dtype", "device", "gpu", "B", "H", "Sq", "Sk", "D", "Dv", "params"]


def _key_text(v) -> str:
    """One spelling per value whether it comes from a row or back from a CSV (NaN/None → '', 16.0 → '16')."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def case_keys(df: pd.DataFrame) -> pd.Series:
    cols = df.reindex(columns=CASE_KEY).astype(object)
    return cols.apply(lambda col: col.map(_key_text)).agg("|".join, axis=1)


def read_results(*dirs) -> pd.DataFrame:
    """Every results.csv below dirs, oldest file first, each file's rows in the order written."""
    files = sorted({p for d in dirs for p in Path(d).rglob("results.csv")}, key=lambda p: (p.stat().st_mtime, p))
    frames = []
    for p in files:
        try:  # a job may be appending to its file right now: a torn last line is skipped, not fatal
            frames.append(pd.read_csv(p, on_bad_lines="skip").reindex(columns=COLUMNS))
        except pd.errors.EmptyDataError:
            continue
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def merge_results(*dirs) -> pd.DataFrame:
    """One table of every job's rows below dirs, one row per case (the last measured)."""
    df = read_results(*dirs)
    return df[~case_keys(df).duplicated(keep="last")].reset_index(drop=True)


def append_row(path: Path, row: dict) -> None:
    """Append one row to a results.csv; a file written with an older schema (fewer columns) is first
    rewritten with today's header, so that no row lands under the wrong column."""
    if path.exists() and path.stat().st_size:
        with open(path) as f:
            header = f.readline().rstrip("\r\n").split(",")
        if header != COLUMNS:
            pd.read_csv(path, on_bad_lines="skip").reindex(columns=COLUMNS).to_csv(path, index=False)
    pd.DataFrame([row], columns=COLUMNS).to_csv(path, mode="a", header=not path.exists() or not path.stat().st_size,
                                                index=False)


def _resume_dir(cfg, out_dir: Path) -> Path:
    if cfg.get("resume_dir"):
        return Path(cfg.resume_dir)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir)  # the whole sweep: a case may have moved to another job dir
    return out_dir


def _lock_run_dir(out_dir: Path):
    """One run per run dir at a time: a sweep re-launched while a job of the earlier launch still runs in
    this dir waits for it, then skips what it measured, so no case is measured twice."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / ".flashlight.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"flashlight.run: {out_dir} is in use by another run (a job of an earlier launch?): "
              f"waiting for it to finish", file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


# ------------------------------------------------------------------------------------------ tuning
def tune_case(plan: Plan, inputs: dict, out_dir: Path | None) -> str:
    """tune=true: tune the case's fused regions (flashlight.tune) before it is timed; the note for its row.

    The study's trial table and pictures go to <run dir>/tune. A failure is noted; the case still runs."""
    from flashlight import tune

    t = plan.tune
    try:
        results = tune.tune(plan.variant.bind(plan.shape), n_trials=t.get("n_trials", 20),
                            storage=t.get("storage"), timeout=t.get("timeout"),
                            trial_timeout=t.get("trial_timeout", 120), rep_ms=t.get("rep_ms", 25),
                            seed=t.get("seed"), **inputs)
    except Exception as e:
        return f"tuning failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    notes = []
    for r in results:
        if out_dir is not None:
            tune.save_report(r, Path(out_dir) / "tune")
        c = r.counts()
        notes.append(f"tuned ({c['trials']} trials in study, {c['pruned']} pruned): default {r.default_ms:.3g} ms "
                     f"→ best {r.best_ms:.3g} ms")
    return "; ".join(notes)


def objective(df: pd.DataFrame) -> float:
    """What a Hydra Optuna sweep (tune=sweep) minimises: the flashlight row's ms; inf unless it is ok."""
    rows = df[df["backend"].astype(str).str.match(r"flashlight( \(|$)")]   # "flashlight (reduce-overhead)" too
    if rows.empty or rows.iloc[0]["status"] != "ok":
        return math.inf
    return float(rows.iloc[0]["ms"])


def quote_bool_overrides(argv: list[str]) -> list[str]:
    """`tune=true` picks configs/tune/true.yaml, but Hydra's grammar reads true as a bool, which cannot
    name a config: quote it (tune='true'), so the spelling users expect works (sweeps too: true,false)."""
    out = []
    for a in argv:
        head, _, values = a.partition("=")
        if head == "tune" and values and all(v.lower() in ("true", "false") for v in values.split(",")):
            a = "tune=" + ",".join(f"'{v.lower()}'" for v in values.split(","))
        out.append(a)
    return out


# ------------------------------------------------------------------------------------------ main
def _versions(device) -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"torch": torch.__version__, "triton": tv, "gpu": gpu, "gpu_index": physical_gpu(device)}


def physical_gpu(device: torch.device) -> str | None:
    """The physical GPU behind device, as named in CUDA_VISIBLE_DEVICES (an index, or a GPU-/MIG- UUID):
    device cuda:i is its i-th entry (i itself where it is unset). On device cpu, the GPU this job was given
    (hydra/launcher=gpus) if any, else None."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in cvd.split(",") if e.strip()] if cvd is not None else None
    if device.type == "cuda":
        i = device.index if device.index is not None else torch.cuda.current_device()
        return entries[i] if entries and i < len(entries) else str(i)
    return entries[0] if entries else None


def _summary(df: pd.DataFrame, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in ("backend", "status", "ms", "TFLOP/s", "prep_ms", "per_batch_ms", "rel_err", "compile_s", "peak MB",
              "reason"):
        t.add_column(c, overflow="fold")
    fmt = lambda x, f: "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, f)  # noqa: E731
    style = {"ok": "green", "wrong": "red", "error": "red", "oom": "red", "not_fused": "yellow",
             "unsupported": "dim"}
    for r in df.to_dict("records"):
        t.add_row(r["backend"], f"[{style.get(r['status'], '')}]{r['status']}", fmt(r["ms"], ".3f"),
                  fmt(r["tflops"], ".3g"), fmt(r.get("prep_ms"), ".3f"), fmt(r.get("per_batch_ms"), ".3f"),
                  fmt(r["rel_err"], ".2e"), fmt(r["compile_s"], ".1f"),
                  fmt(r["peak_mem_mb"], ".0f"), "" if not isinstance(r["reason"], str) else r["reason"][:120])
    Console(width=max(120, shutil.get_terminal_size().columns)).print(t)


def run(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    plan = resolve(cfg)
    from rich.progress import Progress

    s = plan.shape
    base = {"variant": plan.variant.name, "mode": plan.mode, "dtype": str(plan.dtype).replace("torch.", ""),
            "device": plan.device.type, "B": s.B, "H": s.H, "Sq": s.Sq, "Sk": s.Sk, "D": s.D, "Dv": s.dv,
            **_versions(plan.device), "params": repr(dict(s.params)) if s.params else ""}
    path = out_dir / cfg.results
    lock = _lock_run_dir(out_dir)
    done = {}
    if cfg.get("resume", True):
        resume_dir = _resume_dir(cfg, out_dir)
        prev = read_results(resume_dir)
        done = dict(zip(case_keys(prev), prev.to_dict("records")))
    rows, skipped = [], []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"{plan.variant.name} {plan.mode}", total=len(plan.backends))
        for backend in plan.backends:
            key = case_keys(pd.DataFrame([{**base, "backend": backend_label(backend, plan)}]))[0]
            if key in done:  # measured by an earlier launch: keep that row, measure nothing
                rows.append(done[key])
                skipped.append(backend)
                progress.advance(task)
                continue
            progress.update(task, description=f"{plan.variant.name} {plan.mode}: {backend}")
            row = {**base, "backend": backend_label(backend, plan), **run_case(backend, plan, cfg, out_dir)}
            append_row(path, row)
            rows.append(row)
            progress.advance(task)
    if skipped:
        print(f"resume: {', '.join(skipped)} already measured below {resume_dir}, not run again "
              f"(resume=false measures again)")
    lock.close()
    df = pd.DataFrame(rows, columns=COLUMNS)
    _summary(df, f"{plan.variant.name} {plan.mode} {base['dtype']} {plan.device.type} "
                 f"B{s.B} H{s.H} Sq{s.Sq} Sk{s.Sk} D{s.D} Dv{s.dv}  →  {path}")
    return df


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        df = run(cfg, out_dir)
    except ConfigError as e:
        print(f"flashlight.run: {e}", file=sys.stderr)
        sys.exit(2)
    # report=true: a report of this run; a multirun gets one of its sweep dir (flashlight.report.callback.SweepReport)
    if cfg.get("report") and HydraConfig.get().mode == RunMode.RUN:
        from flashlight.report.build import report_after_run  # here: matplotlib only when asked for

        report_after_run(out_dir)
    return objective(df)

