"""Tuning on CPU through the Triton interpreter (timings mean nothing there; the machinery must work):
storage and resume, failures recorded with their reason, compile-time lookup, journal storage, runner."""
import dataclasses
import json
import os
import subprocess
import sys

import optuna
import pandas as pd
import pytest
import yaml
import torch

import flashlight
from flashlight import tune
from flashlight.compiler import runtime
from flashlight.harness import variant_registry as registry
from flashlight.harness.run import CONFIG_DIR, ConfigError, quote_bool_overrides, resolve

optuna.logging.set_verbosity(optuna.logging.WARNING)


def attn(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    return torch.softmax(s.masked_fill(j > i, float("-inf")), -1) @ v


def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 64, 16, generator=g) for _ in range(3)]


def cfg(bm, bn):  # a CPU config (warps and stages mean nothing to the interpreter)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 1}


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache dir and no tuning state: as a new process on a new machine."""
    monkeypatch.setenv("FLASHLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FLASHLIGHT_TUNE_STORAGE", raising=False)
    for name in ("_TUNED", "_LOOKED_UP", "_STORAGES"):
        monkeypatch.setattr(tune, name, {})
    monkeypatch.setattr(tune, "_lookup_storage", None)
    return tmp_path


def kernel_of(fn, *args):
    [(region, _)] = tune.fused_regions(fn, *args)
    return region.ks


def test_default_storage_and_resume(fresh):
    q, k, v = qkv()
    [r] = tune.tune(attn, q, k, v, n_trials=2, seed=0)
    assert (fresh / "cache" / "tune.db").exists()
    ks = kernel_of(attn, q, k, v)
    assert r.kernel == ks.name and r.key == tune.study_key(ks, q.device)
    assert ks.name in r.key and "float32" in r.key and "cpu-interpreter" in r.key and "triton-3." in r.key
    # the known-good default is the first trial
    assert r.study.trials[0].user_attrs["config"] == r.default_config == cfg(32, 32)
    assert len(r.study.trials) == 2

    [r2] = tune.tune(attn, q, k, v, n_trials=3, seed=1)  # resumes: same study, more trials
    assert r2.key == r.key
    study = optuna.load_study(study_name=r.key, storage=tune.default_storage_url())
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert sum(t.user_attrs["config"] == r.default_config and "repeat_of" not in t.user_attrs
               for t in study.trials) == 1  # enqueued once per study, not once per run
    assert r2.best_config in tune.legal_configs(ks, q.device)
    assert all(t.state.name == "COMPLETE" for t in study.trials)


def test_failures_are_pruned_with_their_reason(fresh, monkeypatch):
    q, k, v = qkv()
    beyond_bound = {"BLOCK_M": 256, "BLOCK_N": 32}  # wider than the generator's tile bound
    wrong, broken = cfg(32, 16), cfg(16, 32)
    real_launch = tune.launch

    def launch(region, inputs):  # the test hook: one config computes garbage, one does not compile
        if region.config == wrong:
            return real_launch(region, inputs) * 1.01
        if region.config == broken:
            raise RuntimeError("injected compile failure")
        return real_launch(region, inputs)

    monkeypatch.setattr(tune, "launch", launch)
    [r] = tune.tune(attn, q, k, v, n_trials=5, seed=0, extra_configs=[beyond_bound, wrong, broken])
    trials = r.study.trials
    assert len(trials) == 5  # the study went on after each failure
    first = {json.dumps(t.user_attrs["config"], sort_keys=True): t for t in reversed(trials)}

    def outcome(c):
        t = first[json.dumps(tune.complete_config(c), sort_keys=True)]
        return t.state.name, t.user_attrs.get("failure", "")

    state, why = outcome(beyond_bound)
    assert state == "PRUNED" and "exceeds the generator's tile bound 128" in why
    state, why = outcome(wrong)
    assert state == "PRUNED" and why.startswith("wrong result: rel err")
    state, why = outcome(broken)
    assert state == "PRUNED" and "injected compile failure" in why
    assert outcome(r.default_config) == ("COMPLETE", "")
    assert r.best_config not in (wrong, broken)


def test_nothing_works_is_a_clear_error(fresh):
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="no config ran correctly.*timeout"):
        tune.tune(attn, q, k, v, n_trials=1, trial_timeout=0.0)  # every config "times out"
    with pytest.raises(ValueError, match="no fused attention region"):
        tune.tune(lambda x: x.relu(), q)


def test_compile_looks_up_the_stored_best(fresh, monkeypatch):
    q, k, v = qkv()
    fast = cfg(16, 16)
    # make a non-default config the fastest, whatever the interpreter's timings say
    monkeypatch.setattr(tune, "time_launch", lambda region, inputs, rep_ms=25: 1.0 if region.config == fast else 2.0)
    [r] = tune.tune(attn, q, k, v, n_trials=2, seed=0, extra_configs=[fast])
    assert r.best_config == fast != r.default_config

    # a new process: nothing cached in memory, the stored study is all there is
    monkeypatch.setattr(tune, "_TUNED", {})
    monkeypatch.setattr(tune, "_LOOKED_UP", {})
    torch.compiler.reset()
    out = flashlight.compile(attn)(q, k, v)
    assert runtime.launch_configs[r.kernel] == fast
    torch.testing.assert_close(out, attn(q, k, v), rtol=1e-4, atol=1e-5)

    # an explicit config wins over the stored one
    torch.compiler.reset()
    flashlight.compile(attn, config=cfg(32, 16))(q, k, v)
    assert runtime.launch_configs[r.kernel] == cfg(32, 16)


def test_missing_or_broken_storage_means_the_default(fresh, monkeypatch):
    q, k, v = qkv()
    ks = kernel_of(attn, q, k, v)
    torch.compiler.reset()
    flashlight.compile(attn)(q, k, v)  # no storage at all
    assert runtime.launch_configs[ks.name] == runtime.default_config(ks, "cpu")
    assert not (fresh / "cache" / "tune.db").exists()  # looking up created nothing
    monkeypatch.setenv("FLASHLIGHT_TUNE_STORAGE", f"journal://{fresh / 'nowhere' / 'studies.log'}")
    torch.compiler.reset()
    flashlight.compile(attn)(q, k, v)
    assert runtime.launch_configs[ks.name] == runtime.default_config(ks, "cpu")
    assert not (fresh / "nowhere").exists()

    (fresh / "garbage.db").write_text("not a database")
    monkeypatch.setenv("FLASHLIGHT_TUNE_STORAGE", f"sqlite:///{fresh / 'garbage.db'}")
    torch.compiler.reset()
    with pytest.warns(UserWarning, match="cannot read tuned configs"):
        out = flashlight.compile(attn)(q, k, v)
    assert runtime.launch_configs[ks.name] == runtime.default_config(ks, "cpu")
    torch.testing.assert_close(out, attn(q, k, v), rtol=1e-4, atol=1e-5)


def test_journal_storage(fresh):
    q, k, v = qkv()
    path = fresh / "shared" / "studies.log"
    url = f"journal://{path}"  # journal:///abs/path
    [r] = tune.tune(attn, q, k, v, n_trials=2, seed=0, storage=url)
    assert path.exists()
    tune._STORAGES.clear()  # read it back from the file
    tune.tune(attn, q, k, v, n_trials=1, seed=1, storage=url)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    assert len(optuna.load_study(study_name=r.key, storage=storage).trials) == 3


def test_search_space_and_resource_estimates(fresh, monkeypatch):
    q, k, v = qkv()
    ks = kernel_of(attn, q, k, v)
    cpu = torch.device("cpu")
    space = tune.search_space(ks, cpu)
    assert space == {"BLOCK_M": [16, 32], "BLOCK_N": [16, 32], "num_warps": [4], "num_stages": [1]}
    assert "power" in tune.check_config(ks, {"BLOCK_M": 24, "BLOCK_N": 32}, cpu)
    assert "tile bound" in tune.check_config(ks, {"BLOCK_M": 32, "BLOCK_N": 256}, cpu)
    assert "lacks" in tune.check_config(ks, {"BLOCK_N": 32}, cpu)

    # the GPU side, judged without a GPU: the space and the shared memory estimate
    monkeypatch.setattr(tune, "interpreting", lambda: False)
    gpu = torch.device("cuda", 0)
    # float32 at full precision: tiles multiplied on the CUDA cores, a space of smaller tiles
    assert ks.cuda_core_dots and tune.search_space(ks, gpu)["BLOCK_M"] == [16, 32, 64]
    ks = dataclasses.replace(ks, cuda_core_dots=False)   # tensor-core tiles (16-bit, or TF32 allowed)
    space = tune.search_space(ks, gpu)
    default = runtime.default_config(ks, "cuda")
    # S=64: no tile wider than 64, but the default (which seeds every study) is always in
    assert space["BLOCK_M"] == sorted({32, 64, default["BLOCK_M"]})
    assert space["BLOCK_N"] == sorted({32, 64, default["BLOCK_N"]})
    assert set(space["num_stages"]) >= {2, 3, 4} and set(space["num_warps"]) >= {4, 8}
    small, _ = tune.estimate_resources(ks, {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})
    big, _ = tune.estimate_resources(ks, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4})
    assert 0 < small < big
    too_big = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    assert "shared memory" in tune.check_config(ks, too_big, gpu, smem_limit=(small + big) // 2)
    monkeypatch.setattr(tune, "shared_memory_limit", lambda device: 227 * 1024)  # an H100's
    assert too_big in tune.legal_configs(ks, gpu) and tune.complete_config(default) in tune.legal_configs(ks, gpu)
    monkeypatch.setattr(tune, "shared_memory_limit", lambda device: (small + big) // 2)
    legal = tune.legal_configs(ks, gpu)
    assert too_big not in legal and {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2} in legal


def test_tune_true_spelling_and_options():
    from hydra import compose, initialize_config_dir

    assert quote_bool_overrides(["tune=true", "tune=True,false", "tune.n_trials=3", "x=true"]) == \
        ["tune='true'", "tune='true','false'", "tune.n_trials=3", "x=true"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        on = compose(config_name="config", overrides=["tune='true'", "tune.n_trials=30", "shape=tiny",
                                                      "tune.storage=journal:///tmp/x.log"])
        off = compose(config_name="config", overrides=["shape=tiny"])
        both = compose(config_name="config", overrides=["tune='true'", "shape=tiny", "+tune.config.BLOCK_M=64"])
    assert on.tune.enabled is True and on.tune.n_trials == 30 and on.tune.storage == "journal:///tmp/x.log"
    assert off.tune.enabled is False and set(off.tune) == set(on.tune)
    assert resolve(on).tune["n_trials"] == 30
    with pytest.raises(ConfigError, match="drop one"):
        resolve(both)


def test_runner_tune_true(tmp_path):
    db = tmp_path / "tune.db"
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLASHLIGHT_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "flashlight.run", "variant=causal", "shape=tiny", "shape.H=2",
                        "shape.Sq=64", "shape.Sk=64", "backends=[flashlight]", "tune=true", "tune.n_trials=2",
                        f"tune.storage=sqlite:///{db}", "timing.warmup=1", "timing.repeat=1",
                        f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    row = pd.read_csv(tmp_path / "run" / "results.csv").iloc[0]
    assert row["status"] == "ok" and row["reason"].startswith("tuned"), row.to_dict()
    [launched] = json.loads(row["config"])
    assert set(launched) == set(tune.KNOBS)
    pictures = sorted(f.name for f in (tmp_path / "run" / "tune").iterdir())
    assert any(n.endswith("-history.png") for n in pictures) and any(n.endswith("-trials.csv") for n in pictures)
    [summary] = optuna.get_all_study_summaries(f"sqlite:///{db}")
    assert summary.n_trials == 2

    # the same case tuned again from Python (another process, same key) resumes the runner's study
    v = registry.get("causal")
    shape = v.shape(1, 2, 64, 64, 16, None)
    [r] = tune.tune(v.bind(shape), n_trials=1, storage=f"sqlite:///{db}", **v.make_inputs(shape, torch.float32, "cpu"))
    assert r.key == summary.study_name and len(r.study.trials) == 3


def test_hydra_optuna_sweeper_tunes_tiles_one_job_per_trial(tmp_path):
    # tune=sweep: Hydra's Optuna sweeper, one runner job per tile config, each row checked and written
    db = tmp_path / "tiles.db"
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLASHLIGHT_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "flashlight.run", "-m", "tune=sweep", "variant=causal", "shape=tiny",
                        "shape.H=2", "shape.Sq=64", "shape.Sk=64", "backends=[flashlight]", "timing.warmup=1",
                        "timing.repeat=1", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage=sqlite:///{db}",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = pd.concat(pd.read_csv(f) for f in (tmp_path / "sweep").glob("*/results.csv"))
    assert len(rows) == 3 and (rows["status"] == "ok").all(), rows[["status", "reason", "config"]]
    launched = [json.loads(c)[0] for c in rows["config"]]
    [study] = optuna.get_all_study_summaries(f"sqlite:///{db}")
    trials = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{db}").trials
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # each trial's config is the one the job launched, and its value is that job's time
    for t in trials:
        cfg = {k.removeprefix("tune.config."): v for k, v in t.params.items()}
        assert cfg in launched
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(rows["ms"].min(), rel=1e-6)


def test_workers_creating_one_sqlite_file_at_once_all_get_the_storage(fresh, tmp_path, monkeypatch):
    """Two tuning workers on a fresh SQLite file race to create Optuna's tables; the loser's "table ...
    already exists" is retried, not a failed tuning (hydra/launcher=gpus with one worker per GPU)."""
    import sqlalchemy.exc

    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kw):
        calls.append(url)
        if len(calls) == 1:  # the other worker created the tables between our check and our CREATE
            raise sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        return real(url, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert tune.open_storage(url) is not None and len(calls) == 2
    calls.clear()
    with pytest.raises(sqlalchemy.exc.OperationalError, match="disk I/O"):  # anything else is not retried
        monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kw: (_ for _ in ()).throw(
            sqlalchemy.exc.OperationalError("x", {}, Exception("disk I/O error"))))
        tune.open_storage(f"sqlite:///{tmp_path / 'other.db'}")


def test_a_trial_another_worker_finished_first_is_not_counted(tmp_path):
    """Workers sharing an SQLite study can both take the same enqueued trial (SQLite has no row locks); the
    second to report it is refused by Optuna ("Cannot tell a COMPLETE trial"), which used to end that worker's
    tuning with an error. Here the other worker is simulated: it finishes the first trial while this one runs
    it. This worker still adds its own n_trials, and every trial of the study is finished once."""
    storage = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=storage)
    other = optuna.load_study(study_name="race", storage=storage)
    study.enqueue_trial({"x": 1.0})

    class Objective:
        calls = 0

        def __call__(self, trial):
            self.calls += 1
            x = trial.suggest_float("x", 0.0, 2.0)
            if self.calls == 1:   # the other worker took the same enqueued trial and reported it first
                other.tell(trial.number, x)
            return x

    objective = Objective()
    tune._optimize(study, objective, n_trials=2, timeout=None)
    trials = optuna.load_study(study_name="race", storage=storage).get_trials()
    assert objective.calls == 3 and len(trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
