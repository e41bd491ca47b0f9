"""Real model files: one training step of small transformers models (scripts/check_transformers.py) fuses
every attention forward and backward, with the eager copy's loss and gradients. GPT-2 (a causal buffer and
Conv1D projections), Llama (GQA, rotary embeddings, left padding), T5 (relative position buckets, cross
attention, an embedding shared by two modules) and Swin (a relative position bias read at an index buffer,
shifted-window masks added through a view that splits the batch); Llama and BERT with transformers' SDPA
attention as well."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")   # in the test extra
spec = importlib.util.spec_from_file_location("check_transformers",
                                              Path(__file__).parents[1] / "scripts" / "check_transformers.py")
check_transformers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_transformers)

ATTENTIONS = {"gpt2": 2, "llama": 2, "t5": 6, "swin": 4}


@pytest.mark.parametrize("name", ATTENTIONS)
def test_a_training_step_fuses_every_attention_and_matches_eager(name):
    torch.manual_seed(0)
    r = check_transformers.check(*check_transformers.models()[name])
    assert "error" not in r, r
    assert r["fused"] == r["regions"] == r["backward"] and r["launches"] == ATTENTIONS[name], r
    assert abs(r["loss"] - r["eager_loss"]) < 1e-5 * abs(r["eager_loss"]), r
    assert r["gradient_difference"] < 2e-5 and not r["warnings"], r


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_transformers_sdpa_attention_fuses_and_matches_eager(name):
    """transformers' default attention (`attn_implementation="sdpa"`): one F.scaled_dot_product_attention
    call per layer with the padding and causal masks passed in, traced as its math and fused."""
    torch.manual_seed(0)
    r = check_transformers.check(*check_transformers.models()[name], attn="sdpa")
    assert "error" not in r, r
    assert r["fused"] == r["regions"] == r["backward"] == r["launches"] == 2, r
    assert abs(r["loss"] - r["eager_loss"]) < 1e-5 * abs(r["eager_loss"]), r
    assert r["gradient_difference"] < 2e-5 and not r["warnings"], r
