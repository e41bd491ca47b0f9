"""Launching the generated kernels with little host time.

Triton's ``kernel[grid](*args)`` binds and specialises every argument on every call. Our kernels take
30-odd arguments (the inputs, and a stride per tensor dim), and that costs about 80 µs of host time per
launch on an H200's host, measured: the largest part of a short training step's host time, where the
GPU waits on the host. A :class:`Launcher` keeps, for each argument signature, the compiled kernel that
Triton's launch returned, and launches later calls with the same signature through it directly
(``CompiledKernel[grid](*args)``, Triton's entry point for a compiled kernel), skipping the binding.

The signature covers everything Triton specialises a compiled kernel on, conservatively: each
non-tensor argument's type and value (Triton specialises integers on divisibility by 16 and on being 1),
each tensor's dtype and whether its address is 16-byte aligned, the meta-parameters (tile sizes), the
options (warps, stages) and the current device (a compiled kernel is loaded on one). Anything else, or a
kernel that did not come back compiled (the Triton interpreter's), launches Triton's usual way.
"""
from __future__ import annotations

import warnings

import torch

ALIGN = 16   # Triton specialises a pointer argument on its address being a multiple of this


def signature(tensors, scalars, constexprs: dict, options: dict):
    """What a compiled kernel is specialised on (see the module's docstring), as a hashable key."""
    device = torch.cuda.current_device() if tensors and tensors[0].is_cuda else None
    return (device, tuple([t.dtype for t in tensors]), tuple([t.data_ptr() % ALIGN == 0 for t in tensors]),
            tuple(scalars), tuple(map(type, scalars)), tuple(constexprs.items()), tuple(options.items()))


class Launcher:
    """Launches kernels of one compiled region; see the module's docstring. ``direct`` off: always Triton's
    usual launch."""

    LIMIT = 64   # signatures kept per launcher (a new one is a normal launch; past this, the cache restarts)

    def __init__(self, direct: bool = True):
        self.direct = direct
        self._compiled: dict = {}   # (kernel name, signature) -> (compiled kernel, the meta-parameters' values)
        self.direct_launches = 0    # how many went through a compiled kernel (tests read it)
        self.direct_failed = None   # why direct launches stopped (a Triton whose compiled kernels launch otherwise)

    def __call__(self, kernel, grid, tensors, scalars, constexprs: dict, options: dict):
        """kernel[grid](*tensors, *scalars, **constexprs, **options), through the compiled kernel when its
        signature was seen before. ``tensors`` then ``scalars`` are the leading parameters, in order;
        ``constexprs`` the rest, by name."""
        key = None
        if self.direct:
            key = (getattr(kernel, "__name__", None) or id(kernel), signature(tensors, scalars, constexprs, options))
            hit = self._compiled.get(key)
            if hit is not None:
                compiled, meta = hit
                try:   # CompiledKernel[grid] takes all three grid dims
                    compiled[tuple(grid) + (1,) * (3 - len(grid))](*tensors, *scalars, *meta)
                    self.direct_launches += 1
                    return
                except Exception as e:   # raised on the host, before the launch: Triton's usual way from now on
                    self.direct, self.direct_failed = False, f"{type(e).__name__}: {e}"
                    self._compiled.clear()
                    warnings.warn(f"flashlight: launching a compiled kernel directly failed ({self.direct_failed}); "
                                  "this region's kernels launch Triton's usual way from now on (slower on the host)",
                                  stacklevel=2)
        args = [*tensors, *scalars]
        compiled = _launch(kernel, grid, args, constexprs, options)
        if key is not None and _launchable(compiled):
            names = list(getattr(kernel, "arg_names", ()))[len(args):]
            if sorted(names) == sorted(constexprs):   # every parameter after args is a given meta-parameter
                if len(self._compiled) >= self.LIMIT:
                    self._compiled.clear()
                self._compiled[key] = (compiled, [constexprs[n] for n in names])


def _launch(kernel, grid, args, constexprs: dict, options: dict):
    """Triton's usual launch; returns the compiled kernel it launched (the interpreter returns none)."""
    return kernel[grid](*args, **constexprs, **options)


def _launchable(compiled) -> bool:
    """A compiled kernel Triton can launch by itself (the interpreter returns none)."""
    return compiled is not None and hasattr(compiled, "packed_metadata") and hasattr(type(compiled), "__getitem__")
