"""scripts/train_gpt.py end to end on CPU: a tiny GPT trained for 3 steps under eager and flashlight
(the fused kernels in the Triton interpreter) must run the fused backward and give the same losses."""
import importlib.util
import os

import pytest
import torch

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET=1 before imports"


def load_script():
    spec = importlib.util.spec_from_file_location("train_gpt", REPO / "scripts" / "train_gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train_gpt = load_script()


@pytest.mark.parametrize("attention", ["causal", "diff_attn"])
def test_tiny_training_matches_eager_with_fused_backward(attention, tmp_path, capsys):
    summary = train_gpt.main(["--tiny", "--steps", "3", "--modes", "eager,flashlight",
                              "--attention", attention, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    eager, fl = summary["results"]
    assert (eager["mode"], fl["mode"]) == ("eager", "flashlight")
    assert len(eager["losses"]) == len(fl["losses"]) == 3
    assert fl["fused_launches"] > 0 and fl["fused_backward_launches"] > 0, out
    assert eager["fused_backward_launches"] == 0
    assert summary["max_diff_eager"] < 1e-3, out
    assert summary["ok"], out
    assert summary["explain"].fused and all(r.backward_fused for r in summary["explain"].regions if r.fused)
    assert summary["causal"] == (attention == "causal")   # diff_attn's reference has no causal mask
    assert (tmp_path / "losses.png").stat().st_size > 0
    lines = (tmp_path / "losses.csv").read_text().splitlines()
    assert lines[0] == "step,eager,flashlight" and len(lines) == 4
    assert "flashlight fused backward: yes" in out


def test_mixed_precision_training_runs_the_attention_in_16_bits_fused(tmp_path, capsys):
    """--amp float16: every mode's forward under torch.autocast with loss scaling, as mixed-precision training
    runs (bfloat16, the GPU's choice, computes wrongly in Triton's interpreter). flashlight's attention then
    takes 16-bit q, k, v, fuses forward and backward, and follows eager."""
    summary = train_gpt.main(["--tiny", "--steps", "3", "--modes", "eager,flashlight", "--amp", "float16",
                              "--out", str(tmp_path)])
    out = capsys.readouterr().out
    eager, fl = summary["results"]
    assert fl["fused_launches"] > 0 and fl["fused_backward_launches"] > 0, out
    assert "torch.autocast(float16)" in out and summary["tol"] == 2e-2
    assert summary["max_diff_eager"] < 1e-3 and summary["ok"], out
    from flashlight.compiler import runtime
    assert list(runtime._REGISTRY.values())[-1].ks.out_dtype == torch.float16
    assert eager["losses"] != train_gpt.main(["--tiny", "--steps", "3", "--modes", "eager",
                                              "--out", str(tmp_path)])["results"][0]["losses"]  # not float32


def test_unknown_and_unsupported_variants_list_the_supported_ones():
    for name in ("no_such_variant", "evoformer"):
        with pytest.raises(ValueError, match="supported: causal, alibi, softcap, sliding_window, diff_attn, sinks"):
            train_gpt.main(["--tiny", "--steps", "1", "--modes", "eager", "--attention", name])


def test_gqa_groups_follow_the_head_count(tmp_path, capsys):
    """gqa's default of 4 query heads per K/V head does not divide the GPU preset's 6 heads: the script picks
    the largest group size that does and says so; a group size given that does not divide is an error
    naming the fix."""
    summary = train_gpt.main(["--tiny", "--heads", "6", "--d-model", "48", "--steps", "1", "--modes", "flashlight",
                              "--attention", "gqa", "--out", str(tmp_path)])
    assert "using groups=3" in capsys.readouterr().out
    assert summary["results"][0]["fused_backward_launches"] > 0
    with pytest.raises(ValueError, match="does not divide --heads 6"):
        train_gpt.main(["--tiny", "--heads", "6", "--steps", "1", "--modes", "eager", "--attention", "gqa",
                        "--param", "groups=4"])
