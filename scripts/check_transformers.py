"""One training step of small transformers models, compiled with flashlight, against an eager copy.

    pip install transformers            # not a flashlight dependency
    TRITON_INTERPRET=1 python scripts/check_transformers.py [MODEL ...] [--list]
    python scripts/check_transformers.py --device cuda       # on a GPU
    TRITON_INTERPRET=1 python scripts/check_transformers.py --attn sdpa   # transformers' SDPA attention

Each model is built with two layers, tiny sizes and eager attention (`attn_implementation="eager"`: the
attention flashlight sees as PyTorch ops; `--attn sdpa`: transformers' default, one
F.scaled_dot_product_attention call with the mask, which flashlight traces in its math form), and takes one training step on random tokens with padding in one
batch row (left padding for decoders, right padding for encoders) or on random images. Prints, per model: how
many attention regions `flashlight.explain` fused (forward and backward), how many fused backward launches
the step made, the loss of both copies, the largest relative difference between their parameter gradients
(gradients whose norm is below 1e-6 are left out: a key projection's bias gets a gradient of 0 up to
rounding, whatever computes it), and why any region did not fuse. A model that transformers cannot build with
these sizes is reported and skipped. On the CPU the fused kernels run in Triton's interpreter, in float32.
The compiled copy always runs the fused kernels (`choose_faster=False`: on a GPU, a small model's first
step would otherwise time them against Inductor's code and could run that instead).
"""
import argparse
import copy
import sys
import warnings

import torch

import flashlight

LAYERS = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _text(left_pad):
    ids = torch.randint(3, 97, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    if left_pad:
        mask[1, :5] = 0
    else:
        mask[1, -5:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids)


def _seq2seq():
    batch = _text(left_pad=False)
    return {**batch, "labels": torch.randint(3, 97, (2, 16))}


def _images():
    return dict(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]))


def models():
    """name -> (model class, config, inputs maker)."""
    import transformers as T
    decoder, encoder = (lambda: _text(left_pad=True)), (lambda: _text(left_pad=False))
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.0,
                                                 resid_pdrop=0.0, embd_pdrop=0.0), decoder),
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**LAYERS, num_key_value_heads=2), decoder),
        "mistral": (T.MistralForCausalLM, T.MistralConfig(**LAYERS, num_key_value_heads=2, sliding_window=8), decoder),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**LAYERS, num_key_value_heads=2), decoder),
        "gemma": (T.GemmaForCausalLM, T.GemmaConfig(**LAYERS, num_key_value_heads=1, head_dim=16), decoder),
        "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config(**LAYERS, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                                       query_pre_attn_scalar=16), decoder),
        "mixtral": (T.MixtralForCausalLM, T.MixtralConfig(**LAYERS, num_key_value_heads=2, num_local_experts=2,
                                                          num_experts_per_tok=1), decoder),
        "phi": (T.PhiForCausalLM, T.PhiConfig(**LAYERS, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0,
                                              attention_dropout=0.0), decoder),
        "stablelm": (T.StableLmForCausalLM, T.StableLmConfig(**LAYERS, num_key_value_heads=2,
                                                             partial_rotary_factor=0.25), decoder),
        "starcoder2": (T.Starcoder2ForCausalLM, T.Starcoder2Config(**LAYERS, num_key_value_heads=2, sliding_window=8,
                                                                   residual_dropout=0.0, embedding_dropout=0.0,
                                                                   attention_dropout=0.0), decoder),
        "gpt_neox": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig(**LAYERS, rotary_pct=0.5, hidden_dropout=0.0,
                                                           attention_dropout=0.0), decoder),
        "gptj": (T.GPTJForCausalLM, T.GPTJConfig(vocab_size=97, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), decoder),
        "codegen": (T.CodeGenForCausalLM, T.CodeGenConfig(vocab_size=97, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), decoder),
        "opt": (T.OPTForCausalLM, T.OPTConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              ffn_dim=128, dropout=0.0, attention_dropout=0.0,
                                              word_embed_proj_dim=64), decoder),
        "falcon": (T.FalconForCausalLM, T.FalconConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, alibi=True, attention_dropout=0.0,
                                                       hidden_dropout=0.0), decoder),
        "bloom": (T.BloomForCausalLM, T.BloomConfig(vocab_size=97, hidden_size=64, n_layer=2, n_head=4,
                                                    attention_dropout=0.0, hidden_dropout=0.0), decoder),
        "bert": (T.BertForMaskedLM, T.BertConfig(**LAYERS, **no_dropout), encoder),
        "roberta": (T.RobertaForMaskedLM, T.RobertaConfig(**LAYERS, **no_dropout), encoder),
        "distilbert": (T.DistilBertForMaskedLM, T.DistilBertConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4,
                                                                   hidden_dim=128, dropout=0.0, attention_dropout=0.0),
                       encoder),
        "electra": (T.ElectraForMaskedLM, T.ElectraConfig(**LAYERS, embedding_size=32, **no_dropout), encoder),
        "deberta_v2": (T.DebertaV2ForMaskedLM, T.DebertaV2Config(**LAYERS, **no_dropout, relative_attention=True,
                                                                 position_buckets=16, max_relative_positions=32,
                                                                 pos_att_type=["p2c", "c2p"]), encoder),
        "t5": (T.T5ForConditionalGeneration, T.T5Config(vocab_size=97, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                        num_heads=4, dropout_rate=0.0, relative_attention_num_buckets=8,
                                                        decoder_start_token_id=0, pad_token_id=0), _seq2seq),
        "bart": (T.BartForConditionalGeneration, T.BartConfig(vocab_size=97, d_model=64, encoder_layers=2,
                                                              decoder_layers=2, encoder_attention_heads=4,
                                                              decoder_attention_heads=4, encoder_ffn_dim=128,
                                                              decoder_ffn_dim=128, dropout=0.0, attention_dropout=0.0,
                                                              activation_dropout=0.0), _seq2seq),
        "whisper": (T.WhisperForConditionalGeneration, T.WhisperConfig(
            vocab_size=97, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=8,
            max_source_positions=16, max_target_positions=32, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, decoder_start_token_id=1, pad_token_id=0),
            lambda: dict(input_features=torch.randn(2, 8, 32), labels=torch.randint(3, 97, (2, 12)))),
        "vit": (T.ViTForImageClassification, T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=128, image_size=32, patch_size=8,
                                                         **no_dropout), _images),
        "beit": (T.BeitForImageClassification, T.BeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                            intermediate_size=128, image_size=32, patch_size=8,
                                                            use_relative_position_bias=True, drop_path_rate=0.0,
                                                            **no_dropout), _images),
        "swin": (T.SwinForImageClassification, T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                                            num_heads=[2, 4], window_size=4, drop_path_rate=0.0,
                                                            **no_dropout), _images),
    }


def check(cls, config, make_inputs, device="cpu", attn="eager") -> dict:
    """One training step of the model, compiled and eager: what fused, the losses, the largest gradient
    difference (see the module's docstring); {"error": why} if transformers cannot build it."""
    config._attn_implementation = attn
    try:
        model = cls(config).float().train().to(device)
    except Exception as e:   # transformers' own checks on the tiny sizes
        return {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    inputs = {name: t.to(device) for name, t in make_inputs().items()}
    reference = copy.deepcopy(model)
    report = flashlight.explain(model, **inputs)
    torch._dynamo.reset()
    before = flashlight.counters["fused_backward_launches"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = flashlight.compile(model, choose_faster=False)(**inputs).loss   # the fused kernels, never swapped
        loss.backward()
    ref_loss = reference(**inputs).loss
    ref_loss.backward()
    worst, worst_name = 0.0, "-"
    for (pname, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is None or q.grad.norm() < 1e-6:
            continue
        err = ((p.grad.double() - q.grad.double()).norm() / q.grad.double().norm()).item()
        if err > worst:
            worst, worst_name = err, pname
    return {"regions": len(report.regions), "fused": sum(r.fused for r in report.regions),
            "backward": sum(bool(r.backward_fused) for r in report.regions),
            "launches": flashlight.counters["fused_backward_launches"] - before,
            "loss": loss.item(), "eager_loss": ref_loss.item(), "gradient_difference": worst, "worst": worst_name,
            "not_fused": sorted({r.reason[:100] for r in report.regions if not r.fused}),
            "warnings": [str(w.message)[:120] for w in caught if "flashlight" in str(w.message)]}


def row(name, r: dict) -> str:
    if "error" in r:
        return f"{name:11s} not built ({r['error']})"
    return (f"{name:11s} regions fused {r['fused']}/{r['regions']} (backward {r['backward']}), backward launches "
            f"{r['launches']}, loss {r['loss']:.6f} vs eager {r['eager_loss']:.6f}, largest gradient difference "
            f"{r['gradient_difference']:.1e} ({r['worst']})" +
            (f"; not fused: {r['not_fused']}" if r["not_fused"] else "") +
            (f"; warnings: {r['warnings']}" if r["warnings"] else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the model names and exit")
    parser.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                        help="transformers' attention implementation (sdpa: F.scaled_dot_product_attention)")
    parser.add_argument("--device", default="cpu", help="where both copies run (cpu, through Triton's "
                        "interpreter, or cuda: the kernels compiled for the GPU)")
    args = parser.parse_args(argv)
    try:
        table = models()
    except ImportError:
        sys.exit("check_transformers.py needs transformers: pip install transformers")
    if args.list:
        print(" ".join(table))
        return
    unknown = [m for m in args.models if m not in table]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; known: {' '.join(table)}")
    torch.manual_seed(0)
    for name in args.models or table:
        print(row(name, check(*table[name], device=args.device, attn=args.attn)), flush=True)


if __name__ == "__main__":
    main()
