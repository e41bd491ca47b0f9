"""The fused op: load generated kernels (cached in-process and on disk), compute launch arguments, launch.

Compiled regions are registered under a key (hash of the kernel source and launch config) and
called through one custom op, ``flashlight::fused_attention(inputs, key)``. Because it is a
``torch.library`` op, Inductor treats it as an opaque kernel, and ``register_autograd`` is where the
generated backward will attach (recompute from the saved log-sum-exp).
"""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import math
import os
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashlight.compiler.codegen import KernelSource, access_layout

counters: collections.Counter = collections.Counter()

_REGISTRY: dict = {}        # key -> CompiledRegion
launch_configs: dict = {}   # kernel name -> the config of its latest launch (the runner reports it)
_MODULES: dict = {}         # source hash -> loaded kernel function


def cache_dir() -> Path:
    base = os.environ.get("FLASHLIGHT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flashlight")
    path = Path(base) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load_kernel(ks: KernelSource, dump_dir=None):
    """Write the source to the on-disk cache (Triton needs a real file) and import it once.

    Returns the module: it holds the attention kernel and, for data-dependent masks, the tile
    classification kernel."""
    digest = hashlib.sha256(ks.source.encode()).hexdigest()[:20]
    if dump_dir := dump_dir or os.environ.get("FLASHLIGHT_DUMP"):
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        (Path(dump_dir) / f"{ks.name}.py").write_text(ks.source)
    key = (digest, interpreting())
    if key in _MODULES:
        return _MODULES[key]
    path = cache_dir() / f"{ks.name}.py"
    if not path.exists() or path.read_text() != ks.source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(ks.source)
        tmp.replace(path)
    mod_name = f"flashlight_kernels.{ks.name}_{int(interpreting())}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    _MODULES[key] = mod
    return mod


def default_config(ks: KernelSource, device_type: str) -> dict:
    """A safe starting tile config; tuning (issue: autotuning) replaces it with measured ones."""
    if device_type != "cuda":
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    e = 1 << max(4, (ks.sizes["e"] - 1).bit_length())
    n_dot = ks.n_dot
    d = max((1 << max(4, (s - 1).bit_length())) for a, s in ks.sizes.items() if a.startswith("d"))
    width = n_dot * e
    if width <= 128 and d <= 64:
        # H100, bf16, every variant at S1k and S4k (2026-11-25, six configs side by side): 64×64 tiles
        # with 4 warps were the fastest or within 3% of it; 128×64 with 8 warps lost up to 27% on
        # masked variants (sliding window, documents, ALiBi) and was never more than 3% ahead
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    block_m = 128 if width <= 128 and d <= 128 else 64
    block_n = 64 if d <= 64 else 32
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8 if block_m == 128 else 4, "num_stages": 3}



# Tuned configs. The tuner (flashlight.tune, which imports this module) registers how to look up the
# best stored config of a kernel, and bumps tuned_generation when it finds a new best in this process
# (compiled regions then look again). The runtime imports nothing of the tuner.
_tuned_lookup = None  # (KernelSource, torch.device) -> dict | None; never tunes, never raises
tuned_generation = 0


def register_tuned_lookup(lookup) -> None:
    global _tuned_lookup
    _tuned_lookup = lookup


@dataclass
class CompiledRegion:
    ks: KernelSource
    config: dict = field(default_factory=dict)
    dump_dir: str | None = None
    _kernel: object = field(default=None, repr=False)
    _args: dict = field(default_factory=dict, repr=False)   # input layouts -> stride arguments
    _tuned: tuple | None = field(default=None, repr=False)  # (tuned_generation, stored best config or None)
    _classified: tuple | None = field(default=None, repr=False)  # (what it was computed from, ranges table)

    @property
    def key(self):
        return hashlib.sha256(self.ks.source.encode()).hexdigest()[:20]

    def launch_args(self, inputs):
        """Stride/offset arguments, replayed from the view chains once per input layout."""
        layout = tuple((tuple(t.shape), tuple(t.stride())) for t in inputs)
        if layout not in self._args:
            self._args[layout] = self._compute_args(inputs)
        return self._args[layout]

    def _compute_args(self, inputs):
        params = []
        for slot in self.ks.slots:
            t = inputs[slot.leaf]
            layout, off = access_layout(slot.chain, slot.axes, tuple(t.shape), tuple(t.stride()), 0,
                                        self.ks.sizes)
            table = {(i, j, q): st for (i, j, a, subdims) in layout for q, (s, st) in enumerate(subdims)}
            for p in slot.params:
                params.append(off if p[1] == "offset" else table[(p[1], p[2], p[3])])
        return params

    def launch_config(self, device: torch.device) -> dict:
        """The explicit config, else the best one tuning stored for this kernel on this device (looked
        up once, and again after tune() runs in this process; never tunes), else the default."""
        if self.config:
            return self.config
        if self._tuned is None or self._tuned[0] != tuned_generation:
            self._tuned = (tuned_generation, _tuned_lookup(self.ks, device) if _tuned_lookup else None)
        return self._tuned[1] or default_config(self.ks, device.type)

    def __call__(self, inputs):
        device = inputs[0].device
        if self._kernel is None:
            self._kernel = load_kernel(self.ks, self.dump_dir)
        ks, module = self.ks, self._kernel
        cfg = launch_configs[ks.name] = self.launch_config(device)
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        args = self.launch_args(inputs)
        out = torch.empty(ks.out_shape, dtype=ks.out_dtype, device=device)
        ranges = [self.tile_ranges(inputs, args, bm, bn)] if ks.classifier else []
        grid = (math.ceil(ks.M / bm) * ks.batch,)
        getattr(module, ks.name)[grid](*inputs, out, *ranges, *args, BLOCK_M=bm, BLOCK_N=bn,
                                       num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
        counters["fused_launches"] += 1
        return out

    def tile_ranges(self, inputs, args, bm, bn):
        """Which key tiles each query tile needs, for a mask that reads data: the classification kernel's
        table, reused while the tensors it reads are the same objects, unmodified, with the same tiles."""
        reads = [inputs[i] for i in self.ks.classifier_reads]
        state = _classification_state(reads, args, bm, bn)
        if state is not None and self._classified is not None:
            refs, old_state, table = self._classified
            if old_state == state and all(r() is t for r, t in zip(refs, reads)):
                counters["classifications_reused"] += 1
                return table
        ks = self.ks
        m_tiles, n_tiles = math.ceil(ks.M / bm), math.ceil(ks.N / bn)
        table = torch.zeros(ks.range_rows * m_tiles * 5, dtype=torch.int32, device=inputs[0].device)
        getattr(self._kernel, ks.classifier)[(ks.range_rows * m_tiles * n_tiles,)](
            *inputs, table, *args, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1)
        counters["classifications"] += 1
        # the tensors are held weakly, so a freed tensor never matches a new one at the same address
        self._classified = None if state is None else ([weakref.ref(t) for t in reads], state, table)
        return table


def _classification_state(tensors, args, bm, bn):
    """What a classification depends on besides the tensors' identity: their version counters (bumped by
    every in-place write), layouts, the launch arguments and tiles. None where reuse cannot be proven
    safe: inference tensors keep no version counter, and a CUDA graph being captured must contain the
    classification kernel itself."""
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return None
    try:
        versions = tuple(t._version for t in tensors)
    except RuntimeError:
        return None
    layouts = tuple((t.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())) for t in tensors)
    return versions, layouts, tuple(args), bm, bn


def register(region: CompiledRegion) -> str:
    key = region.key
    _REGISTRY[key] = region
    return key


def lookup(key: str) -> CompiledRegion:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise RuntimeError(f"flashlight: no compiled region {key!r} in this process "
                           "(was the graph compiled by flashlight in another process?)") from None


# The op is defined with the low-level Library API rather than torch.library.custom_op: the latter
# checks aliasing and autograd in Python on every call, which cost about 50 µs per launch on an H100
# host, as much as the kernel at short sequence lengths. register_autograd works on either.
_LIB = torch.library.Library("flashlight", "DEF")
_LIB.define("fused_attention(Tensor[] inputs, str key) -> Tensor")


def fused_attention(inputs: list[torch.Tensor], key: str) -> torch.Tensor:
    return lookup(key)(inputs)


_LIB.impl("fused_attention", fused_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("flashlight::fused_attention", lib=_LIB)
def _(inputs, key):
    ks = lookup(key).ks
    return inputs[0].new_empty(ks.out_shape, dtype=ks.out_dtype)
