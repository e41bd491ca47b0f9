"""Attention variants for the harness: a tiny common interface and a registry.

A variant is one module in the top-level ``variants`` package. It defines:

    DESCRIPTION: str
    PARAMS: dict                      # variant extras with defaults (window, cap, ...)
    INPUTS: tuple[str, ...]           # names of the tensors reference() takes, in order
    LEARNABLE: tuple[str, ...]        # inputs that get gradients in mode=fwdbwd (default q, k, v)
    reference(**inputs, **params)     # plain PyTorch, the thing a compiler should fuse
    make_inputs(shape, dtype, device, requires_grad=False, seed=0) -> dict[str, Tensor]
    check(shape)                      # optional: raise ValueError if the shape cannot work
    flops(shape) -> float             # useful forward FLOPs (masked-out work not counted)
    flex(inputs, prep, attention=flex_attention, **params) -> Tensor   # or flex = None
    sdpa(inputs, prep, **params) -> Tensor  # may raise Unsupported(reason)
    flex_prepare(inputs, **params) -> prep  # optional: one-off work an expert does before the calls
    sdpa_prepare(inputs, **params) -> prep  # (block masks, materialised masks/biases); default None
    MASK_INPUTS: tuple[str, ...]      # optional: inputs that define the mask and change every batch in
                                      # training (document ids): their preparation is redone per batch

Preparation is what a user builds once per (variant, params, shape, device) — or, for MASK_INPUTS, once
per batch — and passes to every call: the runner times it on its own (results column ``prep_ms``), never
inside the timed call (``ms``). What depends on a learnable input (a bias table) stays in the call, so
that gradients reach it. For MASK_INPUTS variants the runner also times prep + call with the mask inputs
changing every call (``per_batch_ms``).

Adding a variant = one file in variants/ + one configs/variant/<name>.yaml.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from types import ModuleType
from typing import Any, Callable, Mapping

import torch


class Unsupported(Exception):
    """A baseline cannot express this variant (honestly)."""


class UnknownVariant(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


@dataclasses.dataclass(frozen=True)
class Shape:
    """Problem size. ``Dv=None`` means the variant's default (D, or 2*D for diff_attn).
    ``params`` holds variant extras (window, cap, N, ...), already merged with defaults."""

    B: int
    H: int
    Sq: int
    Sk: int
    D: int
    Dv: int | None = None
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # shape.window, shape.cap, ...
        params = object.__getattribute__(self, "params")
        if name in params:
            return params[name]
        raise AttributeError(name)

    @property
    def dv(self) -> int:
        return self.D if self.Dv is None else self.Dv

    def replace(self, **kw) -> "Shape":
        return dataclasses.replace(self, **kw)


def randn(gen: torch.Generator, shape, dtype, device, requires_grad=False) -> torch.Tensor:
    """Random normal, the same for the same seed on the same kind of device. Drawn on the device itself from
    a generator seeded by ``gen`` (a CPU generator): drawing a paper-shape q, k, v on the CPU took about a
    second per backend, a good part of a short sweep job."""
    device = torch.device(device)
    if device.type == "cpu":
        t = torch.randn(*shape, generator=gen, dtype=torch.float32)
    else:
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        on_device = torch.Generator(device).manual_seed(seed)
        t = torch.randn(*shape, generator=on_device, dtype=torch.float32, device=device)
    return t.to(dtype=dtype).requires_grad_(requires_grad)


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def qkv(shape: Shape, dtype, device, requires_grad=False, seed=0, kv_heads=None) -> dict:
    g = generator(seed)
    hk = shape.H if kv_heads is None else kv_heads
    return {
        "q": randn(g, (shape.B, shape.H, shape.Sq, shape.D), dtype, device, requires_grad),
        "k": randn(g, (shape.B, hk, shape.Sk, shape.D), dtype, device, requires_grad),
        "v": randn(g, (shape.B, hk, shape.Sk, shape.dv), dtype, device, requires_grad),
    }


def dense_flops(shape: Shape, density: float = 1.0, n_scores: int = 1, batch: int = 1) -> float:
    """2·B·H·Sq·Sk·(n_scores·D + Dv) × density (= 4·B·H·Sq·Sk·D when Dv = D, one score matmul)."""
    return 2.0 * batch * shape.B * shape.H * shape.Sq * shape.Sk * (n_scores * shape.D + shape.dv) * density


def causal_density(Sq: int, Sk: int) -> float:
    """Fraction of the Sq×Sk score matrix with j <= i (top-left aligned)."""
    kept = sum(min(i + 1, Sk) for i in range(Sq)) if Sq <= 65536 else Sq * Sk / 2
    return kept / (Sq * Sk)


def mask_density(mask_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Sq: int, Sk: int) -> float:
    """Fraction kept by an index mask, counted exactly in row chunks (cheap, CPU)."""
    j = torch.arange(Sk)[None, :]
    kept = 0
    for start in range(0, Sq, 1024):
        i = torch.arange(start, min(Sq, start + 1024))[:, None]
        kept += int(mask_fn(i, j).sum())
    return kept / (Sq * Sk)


def block_mask(mask_mod, B, H, Sq, Sk, device, compiled=False):
    """A FlexAttention block mask, built now (a variant's flex_prepare; the runner calls that once per case,
    outside the timed calls). ``compiled``: through ``torch.compile(create_block_mask)``, as the
    FlexAttention docs advise for masks rebuilt every batch; used on CUDA only (on CPU Inductor's C++
    compile would dominate the tests).

    create_block_mask is looked up on its module at each call (not bound at import), so a test can count
    its calls."""
    from torch.nn.attention import flex_attention as fa

    if compiled and torch.device(device).type == "cuda":
        return _compiled_create_block_mask()(mask_mod, B, H, Sq, Sk, device=device)
    return fa.create_block_mask(mask_mod, B, H, Sq, Sk, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_create_block_mask():
    from torch.nn.attention import flex_attention as fa

    return torch.compile(fa.create_block_mask)


# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    module: ModuleType

    @property
    def description(self) -> str:
        return getattr(self.module, "DESCRIPTION", (self.module.__doc__ or "").strip())

    @property
    def defaults(self) -> dict:
        return dict(getattr(self.module, "PARAMS", {}))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.module.INPUTS)

    @property
    def learnable(self) -> tuple[str, ...]:
        return tuple(getattr(self.module, "LEARNABLE", ("q", "k", "v")))

    @property
    def has_flex(self) -> bool:
        return getattr(self.module, "flex", None) is not None

    def params(self, overrides: Mapping[str, Any] | None = None) -> dict:
        p = self.defaults
        unknown = set(overrides or {}) - set(p)
        if unknown:
            raise ValueError(f"variant {self.name!r} has no parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(p)}")
        p.update(overrides or {})
        return p

    def shape(self, B, H, Sq, Sk, D, Dv=None, **params) -> Shape:
        if Dv is None:
            Dv = getattr(self.module, "default_dv", lambda D: D)(D)
        shape = Shape(B, H, Sq, Sk, D, Dv, self.params(params))
        check = getattr(self.module, "check", None)  # optional: raise ValueError for impossible shapes
        if check is not None:
            check(shape)
        return shape

    # the interface, with params taken from the shape
    def reference(self, **inputs) -> torch.Tensor:
        """The plain-PyTorch reference with default params (use bind() for others)."""
        return self.module.reference(**inputs)

    def bind(self, shape: Shape) -> Callable[..., torch.Tensor]:
        """A plain function of the input tensors (keyword args) with params fixed as constants."""
        ref, params = self.module.reference, dict(shape.params)

        def fn(**inputs):
            return ref(**inputs, **params)

        fn.__name__ = fn.__qualname__ = self.name
        fn.__doc__ = self.description
        return fn

    def make_inputs(self, shape: Shape, dtype=torch.float32, device="cpu", requires_grad=False, seed=0) -> dict:
        inputs = self.module.make_inputs(shape, dtype, device, requires_grad=requires_grad, seed=seed)
        assert tuple(inputs) == self.input_names, (tuple(inputs), self.input_names)
        return inputs

    def flops(self, shape: Shape) -> float:
        return float(self.module.flops(shape))

    @property
    def mask_inputs(self) -> tuple[str, ...]:
        """Inputs that define the mask and change every batch in training (document ids)."""
        return tuple(getattr(self.module, "MASK_INPUTS", ()))

    def flex_prepare(self, inputs: dict, shape: Shape):
        """What a FlexAttention user builds before the calls (block masks, index tables); None if nothing."""
        fn = getattr(self.module, "flex_prepare", None)
        return None if fn is None else fn(inputs, **shape.params)

    def sdpa_prepare(self, inputs: dict, shape: Shape):
        """What an SDPA user builds before the calls (materialised masks/biases); None if nothing."""
        fn = getattr(self.module, "sdpa_prepare", None)
        return None if fn is None else fn(inputs, **shape.params)

    @property
    def has_flex_prepare(self) -> bool:
        return getattr(self.module, "flex_prepare", None) is not None

    @property
    def has_sdpa_prepare(self) -> bool:
        return getattr(self.module, "sdpa_prepare", None) is not None

    _UNSET = object()

    def flex(self, inputs: dict, shape: Shape, attention=None, prep=_UNSET) -> torch.Tensor:
        """The FlexAttention formulation; ``prep`` from flex_prepare (built here when not given)."""
        if not self.has_flex:
            raise Unsupported(f"{self.name}: no FlexAttention formulation")
        if prep is Variant._UNSET:
            prep = self.flex_prepare(inputs, shape)
        kw = {} if attention is None else {"attention": attention}
        return self.module.flex(inputs, prep, **kw, **shape.params)

    def sdpa(self, inputs: dict, shape: Shape, prep=_UNSET) -> torch.Tensor:
        """The SDPA formulation; ``prep`` from sdpa_prepare (built here when not given)."""
        fn = getattr(self.module, "sdpa", None)
        if fn is None:
            raise Unsupported(f"{self.name}: no scaled_dot_product_attention formulation")
        if prep is Variant._UNSET:
            prep = self.sdpa_prepare(inputs, shape)
        return fn(inputs, prep, **shape.params)

    @property
    def sdpa_note(self) -> str | None:
        """Set when the SDPA formulation is exact but materialises a dense mask/bias."""
        return getattr(self.module, "SDPA_NOTE", None)


def _package():
    return importlib.import_module("variants")


def names() -> list[str]:
    """Known variants: every non-private module of the ``variants`` package."""
    pkg = _package()
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def get(name: str) -> Variant:
    known = names()
    if name not in known:
        raise UnknownVariant(f"unknown variant {name!r}; known variants: {', '.join(known)}")
    return Variant(name, importlib.import_module(f"variants.{name}"))


def all_variants() -> list[Variant]:
    return [get(n) for n in names()]
