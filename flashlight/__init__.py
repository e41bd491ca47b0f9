"""Flashlight: fuse attention written in plain PyTorch into one tiled Triton kernel.

Public API:
    flashlight.compile(fn, **options)            -> compiled callable
    torch.compile(fn, backend="flashlight")       (entry point registered in pyproject)
    flashlight.explain(fn, *args, **kwargs)       -> Report of what fused and why not
    flashlight.counters                           -> launch counters (e.g. "fused_launches")
"""
from flashlight.api import compile, explain, counters  # noqa: F401
from flashlight import tune  # noqa: F401  (registers its stored-config lookup with the runtime)

__all__ = ["compile", "explain", "counters"]
__version__ = "0.1.0"
