"""The runner end to end on CPU (shape=tiny), as a user runs it: `python -m flashlight.run ...`."""
import os
import subprocess
import sys

import pandas as pd
import pytest

FAST = ["shape=tiny", "timing.warmup=1", "timing.repeat=2"]
COLUMNS = {"variant", "backend", "mode", "dtype", "device", "B", "H", "Sq", "Sk", "D", "Dv", "ms", "tflops",
           "rel_err", "status", "reason", "peak_mem_mb", "compile_s", "torch", "triton", "gpu", "step_mem_mb"}


def run(tmp_path, *overrides, check=True):
    env = {**os.environ, "TRITON_INTERPRET": "1", "HYDRA_FULL_ERROR": "0"}
    p = subprocess.run([sys.executable, "-m", "flashlight.run", *overrides, f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def rows(tmp_path):
    df = pd.read_csv(tmp_path / "results.csv")
    assert COLUMNS <= set(df.columns)
    return {r["backend"]: r for r in df.to_dict("records")}


def test_fwd_baselines_and_flashlight(tmp_path):
    p = run(tmp_path, "variant=causal", "backends=[eager,sdpa,flex,flashlight]", *FAST)
    r = rows(tmp_path)
    assert list(r) == ["eager", "sdpa", "flex", "flashlight"]
    for b in ("eager", "sdpa", "flex"):
        assert r[b]["status"] == "ok", r[b]
        assert r[b]["rel_err"] < 1e-4 and r[b]["ms"] > 0 and r[b]["tflops"] > 0
        assert (r[b]["variant"], r[b]["mode"], r[b]["dtype"], r[b]["device"]) == ("causal", "fwd", "float32", "cpu")
    assert r["flex"]["compile_s"] > 0
    # the compiler is young: any outcome is a row with a status, never a crashed run
    assert r["flashlight"]["status"] in {"ok", "not_fused", "error", "wrong"}
    if r["flashlight"]["status"] != "ok":
        assert isinstance(r["flashlight"]["reason"], str) and r["flashlight"]["reason"]
    assert "causal fwd" in p.stdout  # summary table


def test_compile_unsupported_and_params(tmp_path):
    run(tmp_path, "variant=softcap", "variant.params.cap=5.0", "backends=[eager,compile,sdpa]", *FAST)
    r = rows(tmp_path)
    assert r["eager"]["status"] == "ok" and r["compile"]["status"] == "ok", r
    assert r["compile"]["rel_err"] < 1e-4 and r["compile"]["compile_s"] > 0
    assert r["sdpa"]["status"] == "unsupported" and "tanh" in r["sdpa"]["reason"]
    assert "5.0" in r["eager"]["params"]


def test_compile_mode_is_torch_compiles_and_labels_the_rows(tmp_path):
    """compile_mode=reduce-overhead (CUDA graphs on a GPU) reaches the compiled backends; their rows are
    labelled with it, so a sweep over both modes keeps both as cases, and resume tells them apart."""
    run(tmp_path, "variant=causal", "backends=[eager,flashlight]", "compile_mode=reduce-overhead", *FAST)
    run(tmp_path, "variant=causal", "backends=[eager,flashlight]", *FAST)
    df = pd.read_csv(tmp_path / "results.csv")
    assert sorted(df["backend"]) == ["eager", "flashlight", "flashlight (reduce-overhead)"], df["backend"]
    assert (df["status"] == "ok").all(), df[["backend", "status", "reason"]]
    p = run(tmp_path, "variant=causal", "compile_mode=turbo", *FAST, check=False)
    assert p.returncode != 0 and "reduce-overhead" in p.stdout + p.stderr


def test_fwdbwd(tmp_path):
    run(tmp_path, "variant=diff_attn", "mode=fwdbwd", "backends=[eager,sdpa]", *FAST)
    r = rows(tmp_path)
    for b in ("eager", "sdpa"):
        assert r[b]["status"] == "ok" and r[b]["mode"] == "fwdbwd", r[b]
        assert r[b]["Dv"] == 2 * r[b]["D"]


def test_multirun(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-m", "flashlight.run", "-m", "variant=vanilla,document_mask",
                        "backends=[eager]", *FAST, f"hydra.sweep.dir={tmp_path}"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    found = sorted(tmp_path.glob("*/results.csv"))
    assert len(found) == 2
    assert {pd.read_csv(f)["variant"][0] for f in found} == {"vanilla", "document_mask"}


def test_a_job_imports_no_plotting():
    """Hydra builds the report callback in every job's process: a job that writes no report must not pay for
    matplotlib (about a second, and its font cache on a new machine) in each of a sweep's jobs."""
    code = "import sys, flashlight.harness.run, flashlight.report.callback; print(sorted(m for m in sys.modules " \
           "if m.split('.')[0] in ('matplotlib', 'nbformat', 'nbclient')))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout[-2000:] + p.stderr[-2000:]


@pytest.mark.parametrize("overrides, expect", [
    (["variant=nope"], "diff_attn"),                  # Hydra: no such config; lists the options
    (["variant.name=nope"], "known variants: alibi"),  # a config without a variant file
    (["backends=[eager,nope]"], "known backends: eager, compile, sdpa, flex, flashlight"),
])
def test_bad_input_exits_nonzero_listing_known(tmp_path, overrides, expect):
    p = run(tmp_path, *overrides, "shape=tiny", check=False)
    assert p.returncode != 0
    assert expect in p.stderr + p.stdout
    assert not (tmp_path / "results.csv").exists()


# ------------------------------------------------------------------------ baselines measured as users run them
def _cfg(*overrides):
    from hydra import compose, initialize_config_dir

    from flashlight.harness.run import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=["shape=tiny", "timing.warmup=1", "timing.repeat=2",
                                                        *overrides])


def _count_by_timing(monkeypatch, counted: dict):
    """Patch the runner's _bench so that each timing records how many counted calls happened inside it."""
    from flashlight.harness import run as runner

    real_bench, seen = runner._bench, {}

    def bench(step, plan, cfg, what="run"):
        n0 = counted["n"]
        ms = real_bench(step, plan, cfg, what)
        seen[what] = seen.get(what, 0) + counted["n"] - n0
        return ms

    monkeypatch.setattr(runner, "_bench", bench)
    return seen


# (sinks: flex with return_lse does not compile on CPU; its block mask is the causal one)
@pytest.mark.parametrize("variant", ["sliding_window", "prefix_lm", "causal", "document_mask"])
def test_flex_timed_call_builds_no_block_mask(variant, monkeypatch):
    """A FlexAttention user builds the block mask once (per batch for document ids) and passes it to every
    call: create_block_mask must run during preparation, never inside the timed call (ms)."""
    import torch.nn.attention.flex_attention as fa

    from flashlight.harness import run as runner

    calls, real = {"n": 0}, fa.create_block_mask

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(fa, "create_block_mask", counting)
    seen = _count_by_timing(monkeypatch, calls)
    c = _cfg(f"variant={variant}")
    row = runner.run_case("flex", runner.resolve(c), c)
    assert row["status"] == "ok", row
    assert seen["run"] == 0, f"{variant}: create_block_mask ran {seen['run']} times inside the timed flex call"
    untimed = calls["n"] - sum(seen.values())
    assert untimed >= 1, "the block mask is built before the first call"
    assert seen["prep"] >= 1 and row["prep_ms"] > 0
    if variant == "document_mask":  # doc ids change every batch: prep + call, the mask rebuilt each time
        assert seen["per_batch"] >= 1 and row["per_batch_ms"] > 0
    else:
        assert "per_batch" not in seen and row["per_batch_ms"] is None


def test_sdpa_timed_call_materialises_no_mask(monkeypatch):
    """SDPA's materialised masks/biases are built by sdpa_prepare, outside the timed call."""
    from flashlight.harness import run as runner
    from flashlight.harness import variant_registry as registry

    prepared = [v for v in registry.all_variants() if v.has_sdpa_prepare]
    assert {"alibi", "sliding_window", "prefix_lm", "document_mask", "t5_bias"} <= {v.name for v in prepared}
    for v in prepared:
        calls, real = {"n": 0}, v.module.sdpa_prepare

        def counting(*a, _real=real, **k):
            calls["n"] += 1
            return _real(*a, **k)

        monkeypatch.setattr(v.module, "sdpa_prepare", counting)
        seen = _count_by_timing(monkeypatch, calls)
        c = _cfg(f"variant={v.name}")
        row = runner.run_case("sdpa", runner.resolve(c), c)
        assert row["status"] == "ok", (v.name, row)
        assert seen["run"] == 0 and seen["prep"] >= 1 and row["prep_ms"] > 0, (v.name, seen)


def test_a_calls_memory_counts_each_tensor_it_is_given_once():
    """step_mem_mb adds to what a call allocates the tensors it is given: the inputs and a baseline's
    prepared mask (FlexAttention's BlockMask gives its tensors through as_tuple()), each storage once,
    however many views of it are given."""
    import torch
    from flashlight.harness.run import tensor_bytes

    class Prepared:   # a BlockMask-like object
        def __init__(self, *tensors):
            self.tensors = tensors

        def as_tuple(self):
            return self.tensors

    q, mask, ids = torch.zeros(4, 8), torch.zeros(16, dtype=torch.bool), torch.zeros(3, dtype=torch.int64)
    given = ({"q": q, "k": q.t(), "v": q[1:], "ids": ids}, (Prepared(mask, ids), None))
    assert tensor_bytes(given) == 4 * 8 * 4 + 16 + 3 * 8
    assert tensor_bytes(({"q": q}, None)) == 128 and tensor_bytes(None) == 0


def test_a_wrapped_not_implemented_error_marks_the_row_unsupported():
    """Inductor wraps a backend's NotImplementedError (flex_attention with return_lse on CPU) in its own
    error: the runner still reads it as 'this backend does not support the case'."""
    from flashlight.harness.run import _caused_by
    try:
        try:
            raise NotImplementedError("return_lse is not supported on CPU")
        except NotImplementedError as inner:
            raise RuntimeError("InductorError: LoweringException") from inner
    except RuntimeError as e:
        assert _caused_by(e, NotImplementedError)
    assert not _caused_by(ValueError("a real error"), NotImplementedError)


def test_an_error_the_dtype_alone_explains_is_not_called_wrong(monkeypatch):
    """A row is `wrong` only where an error is above the tolerance and above twice what the variant's own
    code, run eagerly in the same dtype, gets against the same reference (a gradient that is a sum of
    terms that nearly cancel is far from float64 in bfloat16 whoever computes it). With the tolerance made
    tiny, eager's own errors are admitted with a note; a backend 0.1% off is still wrong."""
    from flashlight.harness import run as runner
    from flashlight.harness import variant_registry as registry

    monkeypatch.setattr(runner, "tolerance", lambda dtype, device: 1e-12)
    c = _cfg("variant=diff_attn", "mode=fwdbwd")
    plan = runner.resolve(c)
    row = runner.run_case("eager", plan, c)
    assert row["status"] == "ok" and "within 2x eager float32's" in row["reason"], row
    module = registry.get("diff_attn").module
    real = module.sdpa
    monkeypatch.setattr(module, "sdpa", lambda inputs, prep: real(inputs, prep) * 1.001)
    row = runner.run_case("sdpa", plan, c)
    assert row["status"] == "wrong" and "> 2x eager float32's" in row["reason"], row
