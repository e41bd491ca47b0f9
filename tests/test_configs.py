"""Hydra configs compose (Compose API) for every variant and shape, and resolve to a runnable plan."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from flashlight.harness import variant_registry as registry
from flashlight.harness.run import BACKENDS, CONFIG_DIR, ConfigError, resolve

CONFIGS = Path(CONFIG_DIR)
VARIANT_CFGS = sorted(p.stem for p in (CONFIGS / "variant").glob("*.yaml"))
SHAPE_CFGS = sorted(p.stem for p in (CONFIGS / "shape").glob("*.yaml"))


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults():
    c = cfg()
    assert c.variant.name == "diff_attn" and c.shape.name == "auto" and c.mode.name == "fwd"
    assert list(c.backends) == list(BACKENDS) and c.dtype == "auto" and c.device == "auto"
    assert c.tune.enabled is False
    plan = resolve(c)  # CPU here: auto -> tiny, float32
    assert plan.shape.Sq == 128 and str(plan.dtype) == "torch.float32" and plan.shape.dv == 2 * plan.shape.D


def test_one_config_per_variant():
    assert VARIANT_CFGS == registry.names()


@pytest.mark.parametrize("name", VARIANT_CFGS)
def test_variant_composes(name):
    c = cfg(f"variant={name}", "shape=tiny")
    assert c.variant.name == name
    plan = resolve(c)
    assert plan.variant.name == name
    assert set(plan.shape.params) == set(registry.get(name).defaults)


@pytest.mark.parametrize("shape", SHAPE_CFGS)
def test_shape_composes(shape):
    c = cfg(f"shape={shape}", "variant=causal", "device=cpu")
    plan = resolve(c)
    if shape != "auto":
        assert (plan.shape.B, plan.shape.H, plan.shape.Sq, plan.shape.D) == (c.shape.B, c.shape.H, c.shape.Sq, c.shape.D)


def test_paper_shape():
    s = resolve(cfg("shape=paper", "variant=diff_attn", "device=cpu")).shape
    assert (s.B, s.H, s.Sq, s.Sk, s.D, s.dv) == (4, 32, 4096, 4096, 64, 128)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_modes(mode):
    assert resolve(cfg(f"mode={mode}")).mode == mode


def test_overrides_reach_variant_params():
    plan = resolve(cfg("variant=sliding_window", "variant.params.window=7", "shape=tiny", "shape.Sq=64"))
    assert plan.shape.window == 7 and plan.shape.Sq == 64


@pytest.mark.parametrize("overrides, match", [
    (["variant.name=nope"], "known variants: .*diff_attn"),
    (["backends=[eager,nope]"], "known backends: eager, compile, sdpa, flex, flashlight"),
    (["dtype=float8"], "unknown dtype"),
    (["variant=gqa", "variant.params.groups=3", "shape=tiny"], "not divisible"),
    (["variant=document_mask", "shape=tiny", "shape.Sk=64"], "Sq == Sk"),
    (["variant=causal", "+variant.params.window=3"], "no parameter"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve(cfg(*overrides))
