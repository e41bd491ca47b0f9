"""Public API: compile, explain, counters."""
from __future__ import annotations

import functools

import torch

from flashlight.compiler.backend import flashlight_backend, is_training, plan
from flashlight.compiler.capture import normalize
from flashlight.compiler.explain import Report
from flashlight.compiler.runtime import counters  # noqa: F401  (re-exported)


def compile(fn, *, dump=None, config=None, inductor=True, block_sparse=True, fullgraph=False, dynamic=False,
            **kwargs):
    """torch.compile `fn` with the flashlight backend.

    dump: directory where generated kernels are written (also FLASHLIGHT_DUMP=dir).
    config: tile config for the fused kernels, e.g. {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8}.
    inductor: compile the rest of the graph with Inductor (False runs it eagerly: quicker to start).
    block_sparse: skip key tiles that a -inf mask provably removes (False computes every tile).
    """
    backend = functools.partial(flashlight_backend, dump=dump, config=config, inductor=inductor,
                                block_sparse=block_sparse)
    functools.update_wrapper(backend, flashlight_backend)
    return torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=dynamic, **kwargs)


def explain(fn, *args, **kwargs) -> Report:
    """Trace `fn(*args, **kwargs)` and report, per attention region, what fused and why not."""
    names = list(kwargs)

    def flat(*xs):
        return fn(*xs[:len(args)], **dict(zip(names, xs[len(args):])))

    inputs = [*args, *kwargs.values()]
    gm = normalize(flat, inputs)
    planned = plan(gm, training=is_training(inputs), example_inputs=inputs)
    report = Report([rep for rep, _, _ in planned])
    if not planned:
        report.notes.append("no attention region (matmul → row program → matmul) found")
    return report
