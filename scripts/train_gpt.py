"""Train a small GPT whose attention is one of the variants in variants/, under eager, torch.compile
(Inductor) and flashlight, from the same initial weights and data order, and compare.

    python scripts/train_gpt.py --attention diff_attn                  # GPU defaults
    python scripts/train_gpt.py --tiny --attention causal              # CPU / CI (Triton interpreter)
    python scripts/train_gpt.py --attention sliding_window --param window=256 --modes eager,flashlight

The model's attention block computes q, k, v (and whatever else the variant's ``reference`` takes:
diff_attn's q1, k1, q2, k2 and a learnable λ, a learnable sink logit per head, ...) and calls the
variant's plain-PyTorch ``reference`` with the variant's default parameters (``--param`` overrides),
so one model definition runs under every mode. The corpus needs no download: the Python standard
library's own source files, as bytes (tokens 0..255), cut into random windows with a fixed seed.

Prints a table (final loss, tokens/s after warm-up, peak memory), checks that flashlight fused the
backward (``flashlight.counters["fused_backward_launches"]`` grew) and that its loss curve matches
eager's, and writes ``losses.csv`` and ``losses.png`` to ``--out``. Exit status 1 if a check fails.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

if not torch.cuda.is_available():
    # the fused kernels run in Triton's interpreter on a CPU-only machine; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flashlight  # noqa: E402
from flashlight.harness import variant_registry as vr  # noqa: E402

# How the model provides each tensor a variant's reference() takes. Variants whose inputs are all
# listed here are supported; others (evoformer's MSA-shaped pair bias and gate, document_mask's
# runtime document ids) need model code of their own.
PROJECTED = {"q", "k", "v", "q1", "k1", "q2", "k2"}      # per-token linear projections, [B, H, S, D]
LEARNED = {"lam", "sink", "table"}                        # learnable parameters of the attention block
SUPPORTED = ("causal", "alibi", "softcap", "sliding_window", "diff_attn", "sinks", "gqa", "prefix_lm",
             "t5_bias", "vanilla")
MODES = ("eager", "compile", "flashlight")

PRESETS = {
    "gpu": dict(layers=6, d_model=384, heads=6, seq=1024, batch=8, steps=200, warmup=10, lr=1e-3),
    "tiny": dict(layers=2, d_model=64, heads=2, seq=64, batch=2, steps=5, warmup=1, lr=1e-3),
}


# ---------------------------------------------------------------------------------------------- data
def stdlib_corpus() -> torch.Tensor:
    """Every *.py under the standard library's directory (not site-packages), sorted, as uint8 bytes."""
    root = Path(os.path.dirname(os.__file__))
    files = sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
    data = b"".join(p.read_bytes() for p in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    """The same random windows for every mode: [(x, y)] * steps, int64 [batch, seq]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        w = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).long()
        out.append((w[:, :-1], w[:, 1:]))
    return out


# ---------------------------------------------------------------------------------------------- model
def variant_for(name: str, params: dict):
    """The registry's variant, checked to be one the model can feed; raises ValueError otherwise."""
    known = vr.names()
    if name not in known:
        raise ValueError(f"unknown attention variant {name!r}; supported: {', '.join(SUPPORTED)} "
                         f"(all variants in variants/: {', '.join(known)})")
    if name not in SUPPORTED:
        v = vr.get(name)
        raise ValueError(f"attention variant {name!r} is not supported by this model (its reference takes "
                         f"{', '.join(v.input_names)}); supported: {', '.join(SUPPORTED)}")
    v = vr.get(name)
    missing = set(v.input_names) - PROJECTED - LEARNED
    assert not missing, (name, missing)
    return v, v.params(params)


class Attention(nn.Module):
    def __init__(self, variant, params: dict, d_model: int, heads: int, layer: int):
        super().__init__()
        # the reference function and input names, not the variant (its module object does not deepcopy)
        self.reference, self.input_names = variant.module.reference, variant.input_names
        self.params, self.H = dict(params), heads
        self.D = d_model // heads
        self.Dv = getattr(variant.module, "default_dv", lambda D: D)(self.D)   # diff_attn: 2·D
        self.kv_heads = heads // params["groups"] if "groups" in params else heads   # gqa
        variant.shape(B=1, H=heads, Sq=8, Sk=8, D=self.D, Dv=self.Dv, **params)   # variant's own check
        self.proj = {}   # input name -> (offset, width, heads, head dim) in the fused projection
        width = 0
        for name in variant.input_names:
            if name in PROJECTED:
                h = self.kv_heads if name in ("k", "v") else heads
                hd = self.Dv if name == "v" else self.D
                self.proj[name] = (width, h * hd, h, hd)
                width += h * hd
        self.qkv = nn.Linear(d_model, width, bias=False)
        self.out = nn.Linear(heads * self.Dv, d_model, bias=False)
        names = variant.input_names
        if "lam" in names:     # diff_attn's λ, initialised as in Ye et al. (λ_init = 0.8 − 0.6·e^(−0.3·l))
            self.lam = nn.Parameter(torch.tensor(0.8 - 0.6 * math.exp(-0.3 * layer)))
        if "sink" in names:    # one sink logit per head
            self.sink = nn.Parameter(torch.zeros(heads))
        if "table" in names:   # T5 relative position bias table [buckets, H]
            self.table = nn.Parameter(0.02 * torch.randn(params["buckets"], heads))

    def forward(self, x):
        B, S, _ = x.shape
        y = self.qkv(x)
        inputs = {}
        for name in self.input_names:
            if name in self.proj:
                off, w, h, hd = self.proj[name]
                inputs[name] = y[..., off:off + w].view(B, S, h, hd).transpose(1, 2)
            else:
                inputs[name] = getattr(self, name)
        o = self.reference(**inputs, **self.params)          # [B, H, S, Dv]
        return self.out(o.transpose(1, 2).reshape(B, S, self.H * self.Dv))


class Block(nn.Module):
    def __init__(self, variant, params, d_model, heads, layer):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(variant, params, d_model, heads, layer)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, variant, params, layers, d_model, heads, seq, vocab=256):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(Block(variant, params, d_model, heads, i) for i in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight   # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x, y):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for blk in self.blocks:
            h = blk(h)
        logits = self.head(self.ln(h))
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def causal_probe(variant, params, heads, D, Dv) -> bool:
    """Does the variant keep query i from seeing keys j > i? Perturb key/value m, watch the outputs
    of queries < m, for every m. A non-causal variant lets a next-token model read its targets."""
    S = 8
    shape = variant.shape(B=1, H=heads, Sq=S, Sk=S, D=D, Dv=Dv, **params)
    inputs = variant.make_inputs(shape, torch.float64, "cpu", seed=1)
    fn = variant.bind(shape)
    before = fn(**inputs)
    for m in range(1, S):
        moved = dict(inputs)
        for name in ("k", "v", "k1", "k2"):
            if name in inputs:
                moved[name] = inputs[name].clone()
                moved[name][..., m, :] += 1.0
        if not torch.allclose(before[..., :m, :], fn(**moved)[..., :m, :], atol=1e-12):
            return False
    return True


# ---------------------------------------------------------------------------------------------- training
def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def train(mode, model0, data, args, device, inductor):
    torch._dynamo.reset()
    torch.manual_seed(args.seed)
    model = copy.deepcopy(model0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    amp = getattr(torch, args.amp) if args.amp != "none" else None
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none
    scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
    if mode == "eager":
        step_fn = model
    elif mode == "compile":
        step_fn = torch.compile(model, mode=args.compile_mode)
    else:
        # the fused kernels are what this example trains with: never swapped for Inductor's code
        step_fn = flashlight.compile(model, inductor=inductor, mode=args.compile_mode, choose_faster=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = dict(flashlight.counters)
    losses, t_start = [], None
    for i, (x, y) in enumerate(data):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_start = time.perf_counter()
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = step_fn(x, y)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        losses.append(loss.item())
        if args.log_every and (i % args.log_every == 0 or i == len(data) - 1):
            print(f"  [{mode}] step {i:4d}  loss {losses[-1]:.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    timed = len(data) - args.warmup
    tok_s = timed * args.batch * args.seq / (time.perf_counter() - t_start) if t_start else float("nan")
    delta = {k: flashlight.counters[k] - before.get(k, 0) for k in ("fused_launches", "fused_backward_launches")}
    return dict(mode=mode, losses=losses, final_loss=losses[-1], tok_s=tok_s,
                peak_mb=peak_memory_mb(device), **delta)


def explain_attention(model, data, device):
    """flashlight.explain on the first block's attention, with inputs that require grad."""
    attn = model.blocks[0].attn.to(device)
    x = torch.randn(data[0][0].shape + (model.tok.embedding_dim,), device=device)
    with torch.no_grad():
        y = attn.qkv(x)
    inputs = {}
    B, S, _ = x.shape
    for name in attn.input_names:
        if name in attn.proj:
            off, w, h, hd = attn.proj[name]
            inputs[name] = y[..., off:off + w].view(B, S, h, hd).transpose(1, 2).detach().requires_grad_(True)
        else:
            inputs[name] = getattr(attn, name).detach().clone().requires_grad_(True)
    return flashlight.explain(lambda **kw: attn.reference(**kw, **attn.params), **inputs)


def write_outputs(results, out: Path, title: str):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "losses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + [r["mode"] for r in results])
        for i in range(len(results[0]["losses"])):
            w.writerow([i] + [f"{r['losses'][i]:.8f}" for r in results])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"eager": "-", "compile": "--", "flashlight": ":"}
    for r in results:
        ax.plot(range(len(r["losses"])), r["losses"], styles.get(r["mode"], "-"), label=r["mode"], lw=2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", default="causal", help=f"variant name: {', '.join(SUPPORTED)}")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a variant parameter, e.g. --param window=256 (value parsed as Python literal)")
    p.add_argument("--modes", default="eager,compile,flashlight", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--tiny", action="store_true", help="CPU/CI preset: 2 layers, d=64, 2 heads, seq 64, batch 2")
    for k in ("layers", "d_model", "heads", "seq", "batch", "steps", "warmup"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile's mode for compile and flashlight, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=None,
                   help="flashlight mode: compile the rest of the graph with Inductor (default: on for "
                        "cuda, off on CPU where the interpreter dominates anyway)")
    p.add_argument("--tol", type=float, default=None,
                   help="max |loss_flashlight - loss_eager| allowed (default 1e-3 on CPU in float32, 2e-2 on GPU or with --amp)")
    p.add_argument("--amp", default="none", choices=["none", "bfloat16", "float16"],
                   help="mixed precision for every mode: the forward under torch.autocast in this dtype (float16 "
                        "with loss scaling), the weights and optimizer in float32; attention then runs in 16 bits, "
                        "on the tensor cores (default none: the model in float32)")
    p.add_argument("--tf32", action="store_true",
                   help="torch.set_float32_matmul_precision('high') for every mode: float32 matmuls (eager's, "
                        "Inductor's and flashlight's tiles) on TF32 tensor cores; default: full float32")
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--out", default="outputs/train_gpt")
    args = p.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "gpu"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.warmup >= args.steps:
        args.warmup = max(0, args.steps - 1)
    if args.log_every is None:
        args.log_every = max(1, args.steps // 10)
    import ast
    params = {}
    for kv in args.param:
        key, _, val = kv.partition("=")
        try:
            params[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            params[key] = val
    args.params = params
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    return args


def main(argv=None) -> dict:
    """Run the comparison; returns {"results": [...], "ok": bool, ...}. Raises ValueError for an
    unknown or unsupported variant."""
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    inductor = (device.type == "cuda") if args.inductor is None else args.inductor
    tol = args.tol if args.tol is not None else (1e-3 if device.type == "cpu" and args.amp == "none" else 2e-2)
    variant, params = variant_for(args.attention, args.params)
    if "groups" in params and args.heads % params["groups"]:   # gqa: query heads per K/V head
        if "groups" in args.params:
            raise ValueError(f"--param groups={params['groups']} does not divide --heads {args.heads}: "
                             "choose groups among the divisors of the head count, or another --heads")
        groups = max(g for g in range(1, params["groups"] + 1) if args.heads % g == 0)
        print(f"note: {args.heads} heads: gqa's default of {params['groups']} query heads per K/V head does not "
              f"divide them; using groups={groups} (--param groups=G to choose)")
        params = {**params, "groups": groups}
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    torch.manual_seed(args.seed)
    model0 = GPT(variant, params, args.layers, args.d_model, args.heads, args.seq)
    attn0 = model0.blocks[0].attn
    n_params = sum(p.numel() for p in model0.parameters())
    corpus = stdlib_corpus()
    data = batches(corpus, args.steps, args.batch, args.seq, args.seed)
    print(f"attention: {variant.name} ({variant.description}), params {params or '{}'}; "
          f"reference inputs {', '.join(variant.input_names)}")
    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads (D {attn0.D}, Dv {attn0.Dv}), "
          f"seq {args.seq}, batch {args.batch}, {n_params / 1e6:.2f}M parameters; AdamW lr {args.lr}")
    print(f"data: Python stdlib sources, {len(corpus) / 1e6:.1f}M bytes, byte tokens, seed {args.seed}; "
          f"{args.steps} steps, tokens/s measured after {args.warmup} warm-up step(s)")
    print("precision: " + (f"torch.autocast({args.amp}) around the forward, float32 weights" if args.amp != "none"
                           else "float32" + (" with TF32 matmuls" if args.tf32 else " (full-precision matmuls)")))
    print(f"device: {device}" + (" (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "")
          + f"; flashlight with inductor={inductor}")
    causal = causal_probe(variant, params, args.heads, attn0.D, attn0.Dv)
    if not causal:
        print(f"WARNING: {variant.name}'s reference is not causal (query i sees keys j > i): the model can read "
              "the bytes it is asked to predict, so its loss is not a language-modelling loss. The mode "
              "comparison below is still valid.")

    if "window" in params and params["window"] >= args.seq:
        print(f"note: window={params['window']} >= seq {args.seq}, so {variant.name} equals causal attention "
              f"here; try --param window={max(1, args.seq // 4)}")

    report = None
    if "flashlight" in args.modes:
        report = explain_attention(copy.deepcopy(model0), data, device)

    results = []
    for mode in args.modes:
        print(f"== {mode}", flush=True)
        results.append(train(mode, model0, data, args, device, inductor))

    mem = ("torch.cuda.max_memory_allocated, per mode" if device.type == "cuda"
           else "CPU: resource.getrusage ru_maxrss, the process's peak RSS so far (cumulative over modes)")
    print()
    header = f"{'mode':<11} {'final loss':>11} {'tokens/s':>11} {'peak MB':>9} {'fused fwd':>10} {'fused bwd':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['mode']:<11} {r['final_loss']:>11.5f} {r['tok_s']:>11.1f} {r['peak_mb']:>9.0f} "
              f"{r['fused_launches']:>10d} {r['fused_backward_launches']:>10d}")
    print(f"(peak memory: {mem}; fused fwd/bwd: flashlight.counters launches during the mode)")

    ok = True
    summary = {"results": results, "variant": variant.name, "params": params, "causal": causal,
               "device": str(device), "tol": tol, "explain": report}
    by_mode = {r["mode"]: r for r in results}
    if "flashlight" in by_mode:
        fl = by_mode["flashlight"]
        bwd_ok = fl["fused_backward_launches"] > 0
        ok &= bwd_ok
        print(f"flashlight fused backward: {'yes' if bwd_ok else 'NO'} "
              f"(fused_backward_launches +{fl['fused_backward_launches']}, fused_launches +{fl['fused_launches']})")
        if not bwd_ok:
            print(f"flashlight.explain on the attention:\n{report}")
        for other in ("eager", "compile"):
            if other in by_mode:
                diff = max(abs(a - b) for a, b in zip(fl["losses"], by_mode[other]["losses"]))
                summary[f"max_diff_{other}"] = diff
                good = diff <= tol
                if other == "eager":
                    ok &= good
                print(f"max |loss(flashlight) - loss({other})| over {len(fl['losses'])} steps: {diff:.2e} "
                      f"({'ok' if good else 'ABOVE'} tol {tol:g})")
    if "compile" in by_mode and "eager" in by_mode:
        diff = max(abs(a - b) for a, b in zip(by_mode["compile"]["losses"], by_mode["eager"]["losses"]))
        summary["max_diff_compile_eager"] = diff
        print(f"max |loss(compile) - loss(eager)|: {diff:.2e}")

    out = Path(args.out)
    write_outputs(results, out, f"{variant.name}: {args.layers}L d{args.d_model} H{args.heads} S{args.seq} "
                                f"B{args.batch}, {device}")
    print(f"wrote {out / 'losses.csv'} and {out / 'losses.png'}")
    summary["ok"] = ok
    summary["out"] = out
    return summary


if __name__ == "__main__":
    try:
        sys.exit(0 if main()["ok"] else 1)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
