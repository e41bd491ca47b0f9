"""Never slower than the Inductor code a fused region replaces.

Where attention is small (few heads, short rows, an odd head dim), a call is mostly host time, and
Inductor's unfused kernels can beat the fused one. So the first call of a graph with fused regions on a
GPU also times the same graph as Inductor compiles it without fusion, and the faster of the two runs
from then on — the way max-autotune picks a kernel: once per (fused kernels, GPU), kept in memory and on
disk (`choices.json` beside the kernel cache), so later processes neither time nor compile it again.
The report (`flashlight.explain`, `backend.last_report`) says which runs and the two times.

A training graph (an input requires grad) is timed per training step: forward, then the gradients of
every input that requires grad from random output gradients, on detached copies of the inputs, so no
`.grad`, hook or autograd graph of the program sees the timing. Its choice is its own: a training
forward's kernel saves per-row values an inference one does not, so the two have different keys.

Timed only where it is safe and cheap: graphs that write into no input and draw no random numbers (every
timed call would repeat those effects), no saved-tensor hooks active (activation checkpointing counts and
packs the tensors a forward saves; extra forward passes would upset it), and sizes at which Inductor's
unfused graph holds its scores in at most SCORE_BYTES. Above that, its materialised scores are what the
fused kernel exists to avoid.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import torch

from flashlight.compiler.runtime import cache_dir

aten = torch.ops.aten

SCORE_BYTES = 2**30   # float32 queries × keys scores of Inductor's version, over every region
MARGIN = 0.9          # Inductor runs only if it takes under 90% of the fused time (timing noise)

_CHOICES: dict = {}   # key -> {"runs": "fused" | "inductor", "fused_ms": .., "inductor_ms": ..}


def choice_key(kernel_sources, device: torch.device, configs=None) -> str:
    """The fused kernels (their code without comments or names: the same program traced from a function
    or by dynamo names its nodes differently), the tiles given to compile() (`configs`, one dict per
    kernel; none: the defaults) and the GPU."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    configs = configs or [{}] * len(kernel_sources)
    code = sorted(re.sub(r"_[0-9a-f]{16}\b", "",
                         "\n".join(re.sub(r"\s*#.*$", "", line) for line in src.splitlines()))
                  + repr(sorted(cfg.items())) for src, cfg in zip(kernel_sources, configs))
    return hashlib.sha256("\n".join([*code, name]).encode()).hexdigest()[:20]


def _path():
    return cache_dir().parent / "choices.json"


def known_choice(key: str) -> dict | None:
    """The choice made for these fused kernels on this GPU, in this process or an earlier one."""
    if key not in _CHOICES:
        try:
            _CHOICES.update(json.loads(_path().read_text()))
        except (OSError, ValueError):
            pass
    return _CHOICES.get(key)


def _remember(key: str, choice: dict) -> None:
    _CHOICES[key] = choice
    try:   # merged with what other processes wrote since; a lost race costs one more timing, no error
        known = json.loads(_path().read_text()) if _path().exists() else {}
        known[key] = choice
        tmp = _path().with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(_path())
    except (OSError, ValueError):
        pass


def why_not_timed(aten_gm, regions, args) -> str | None:
    """Why this graph is not timed against Inductor's version (None: it is)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(t.device.type != "cuda" for t in tensors):
        return "not on a GPU"
    if is_training(tensors) and saved_tensor_hooks_active():
        return ("saved-tensor hooks are active (activation checkpointing counts and packs the tensors a forward "
                "saves: extra forward passes would upset it)")
    for n in aten_gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is aten.copy_.default or torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ()):
            return "the graph writes into an input or draws random numbers (timing would repeat that)"
    scores = sum(4 * r.ks.batch * r.ks.M * r.ks.N for r in regions)
    if scores > SCORE_BYTES:
        return f"Inductor's version would hold {scores / 2**30:.1f} GiB of scores"
    return None


def is_training(inputs) -> bool:
    """A training call: grad mode on and an input tensor requires grad."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)


def saved_tensor_hooks_active() -> bool:
    """Are default saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks, which non-reentrant
    activation checkpointing pushes) active? Unknown counts as yes."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError):
        return True


def timed_step(fn, args):
    """What one timed call of `fn` does: an inference graph's call, or a training graph's step (forward,
    then the gradients of the inputs that require grad, from fixed random output gradients), on detached
    copies of the inputs: the program's own tensors, their `.grad`s and hooks take no part."""
    if not is_training(args):
        return lambda: fn(*args)
    copies = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    wrt = [c for c, a in zip(copies, args) if isinstance(a, torch.Tensor) and a.requires_grad]
    outs = [o for o in torch.utils._pytree.tree_leaves(fn(*copies)) if isinstance(o, torch.Tensor) and o.requires_grad]
    if not outs:
        return lambda: fn(*copies)
    grads = [torch.randn_like(o) for o in outs]

    def step():
        outs = [o for o in torch.utils._pytree.tree_leaves(fn(*copies))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.grad(outs, wrt, grads, allow_unused=True)
    return step


def time_both(fused, unfused, args, rounds=3) -> tuple[float, float]:
    """ms per call (training graphs: per step, see timed_step) of each on the GPU's clock (host gaps between
    launches included): the lowest of a few medians, taken in turns, as host-bound calls drift with the
    load of the machine."""
    import triton.testing

    steps = [timed_step(fused, args), timed_step(unfused, args)]
    times = [[triton.testing.do_bench(s, warmup=5, rep=30, return_mode="median") for s in steps]
             for _ in range(rounds)]
    return min(f for f, _ in times), min(u for _, u in times)


def choose(key: str, fused_ms: float, inductor_ms: float, training: bool = False) -> dict:
    runs = "inductor" if inductor_ms < MARGIN * fused_ms else "fused"
    choice = {"runs": runs, "fused_ms": round(fused_ms, 4), "inductor_ms": round(inductor_ms, 4)}
    if training:
        choice["per"] = "training step"
    _remember(key, choice)
    return choice


def describe(choice: dict) -> str:
    per = choice.get("per", "call")   # a training graph's: per training step (forward and backward)
    times = f"fused {choice['fused_ms']:.3f} ms, Inductor's unfused code {choice['inductor_ms']:.3f} ms per {per}"
    if choice["runs"] == "inductor":
        return f"timed slower than Inductor's code at these sizes on this GPU ({times}): Inductor's runs"
    return f"timed against Inductor's code at these sizes on this GPU ({times}): the fused kernel runs"


def report_choice(report, choice: dict) -> None:
    """Say in a report which runs: regions not fused (with the times) where Inductor's does, else a note."""
    note = describe(choice)
    if choice["runs"] == "inductor":
        for rep in report.regions:
            if rep.fused:
                rep.fused, rep.reason = False, note
    else:
        report.notes.append(note)
