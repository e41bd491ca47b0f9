"""Index maps from a tensor's logical positions to its memory, through chains of view ops.

A view chain (view, reshape, expand, permute, transpose, unsqueeze, slice, clone of a view…) can
merge dimensions whose strides are not compatible (``q.transpose(1, 2).reshape(B * H, S, D)``) or
repeat a dimension with stride 0 (``k.repeat_interleave(g, dim=1)`` becomes expand + reshape).
torch would copy there; the kernel does not need to. We keep every logical dimension as a list of
row-major *sub-dimensions* ``(size, stride)``, so any such chain stays index arithmetic:

    offset(i) = sum over sub-dims of ((i // inner) % size) * stride

The same algebra runs at compile time (to fix the structure of the generated index code) and at
launch time (to read the real strides of the tensors the kernel is handed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

aten = torch.ops.aten
prims = torch.ops.prims

SubDims = tuple  # tuple[tuple[int, int], ...]  ((size, stride), ...)


class NotIndexable(Exception):
    """A view chain the grouped-stride algebra cannot follow."""


@dataclass(frozen=True)
class GroupedView:
    dims: tuple  # tuple[SubDims, ...], one entry per logical dimension
    offset: int = 0

    @staticmethod
    def of(shape, stride, offset=0):
        return GroupedView(tuple(((int(s), int(st)),) for s, st in zip(shape, stride)), offset)

    @property
    def shape(self):
        return tuple(math.prod(s for s, _ in d) for d in self.dims)

    # ---- the view ops -------------------------------------------------------------------------
    def reshape(self, new_shape):
        new_shape = _infer_shape(new_shape, math.prod(self.shape))
        flat = [sd for d in self.dims for sd in d if sd[0] != 1]
        out = []
        for size in new_shape:
            group = []
            need = size
            while need > 1:
                if not flat:
                    raise NotIndexable(f"reshape {self.shape} -> {tuple(new_shape)}")
                s, st = flat[0]
                if s <= need and need % s == 0:
                    group.append(flat.pop(0))
                    need //= s
                elif s > need and s % need == 0:
                    # split one sub-dim: the outer part (need) goes here, the inner stays
                    inner = s // need
                    group.append((need, st * inner))
                    flat[0] = (inner, st)
                    need = 1
                else:
                    raise NotIndexable(f"reshape {self.shape} -> {tuple(new_shape)}")
            out.append(tuple(group) or ((1, 0),))
        if flat:
            raise NotIndexable(f"reshape {self.shape} -> {tuple(new_shape)}")
        return GroupedView(tuple(out), self.offset)

    def expand(self, sizes):
        sizes = list(sizes)
        lead = len(sizes) - len(self.dims)
        if lead < 0:
            raise NotIndexable("expand to fewer dims")
        dims = [((int(s), 0),) for s in sizes[:lead]]
        for d, s in zip(self.dims, sizes[lead:]):
            cur = math.prod(x for x, _ in d)
            if s == -1 or s == cur:
                dims.append(d)
            elif cur == 1:
                dims.append(((int(s), 0),))
            else:
                raise NotIndexable(f"expand {cur} -> {s}")
        return GroupedView(tuple(dims), self.offset)

    def permute(self, order):
        order = [o % len(self.dims) for o in order]
        return GroupedView(tuple(self.dims[o] for o in order), self.offset)

    def transpose(self, a, b):
        order = list(range(len(self.dims)))
        a, b = a % len(order), b % len(order)
        order[a], order[b] = order[b], order[a]
        return self.permute(order)

    def unsqueeze(self, dim):
        dims = list(self.dims)
        dim = dim % (len(dims) + 1)
        dims.insert(dim, ((1, 0),))
        return GroupedView(tuple(dims), self.offset)

    def squeeze(self, dims=None):
        shape = self.shape
        if dims is None:
            dims = [i for i, s in enumerate(shape) if s == 1]
        elif isinstance(dims, int):
            dims = [dims]
        dims = {d % max(len(shape), 1) for d in dims if shape[d % len(shape)] == 1}
        return GroupedView(tuple(d for i, d in enumerate(self.dims) if i not in dims), self.offset)

    def slice(self, dim, start, end, step):
        dim %= len(self.dims)
        size = self.shape[dim]
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None else (end + size if end < 0 else end)
        start, end = max(0, min(start, size)), max(0, min(end, size))
        d = self.dims[dim]
        d = tuple(x for x in d if x[0] != 1) or ((1, 0),)
        if len(d) != 1:
            raise NotIndexable("slice of a merged dimension")
        (s, st), = d
        new = ((max(0, -(-(end - start) // step)), st * step),)
        dims = list(self.dims)
        dims[dim] = new
        return GroupedView(tuple(dims), self.offset + start * st)

    def select(self, dim, index):
        dim %= len(self.dims)
        index = index + self.shape[dim] if index < 0 else index
        off = 0
        inner = self.shape[dim]
        for s, st in self.dims[dim]:
            inner //= s
            off += ((index // inner) % s) * st
        dims = list(self.dims)
        del dims[dim]
        return GroupedView(tuple(dims), self.offset + off)


def _infer_shape(shape, numel):
    shape = [int(s) for s in shape]
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = numel // known
    return shape


# Ops that only re-index (or copy, or change the dtype) of their first argument.
VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.slice.Tensor,
    aten.select.int, aten.clone.default, aten.alias.default, aten.contiguous.default,
    aten._to_copy.default, prims.convert_element_type.default, aten.lift_fresh_copy.default,
    aten.detach.default, aten.expand_copy.default, aten.view_copy.default,
    aten.permute_copy.default, aten.unsqueeze_copy.default,
}


@dataclass(frozen=True)
class ViewStep:
    """A view op detached from its graph (kept by compiled kernels to re-read strides at launch)."""
    target: object
    args: tuple
    name: str


def freeze_chain(chain):
    return tuple(ViewStep(n.target, (None,) + tuple(n.args[1:]), n.name) for n in chain)


def apply_view(gv: GroupedView, node) -> GroupedView:
    """Apply one FX view node (whose first argument is the tensor) to a GroupedView."""
    t = node.target
    a = node.args
    if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view_copy.default):
        return gv.reshape(a[1])
    if t in (aten.expand.default, aten.expand_copy.default):
        return gv.expand(a[1])
    if t in (aten.permute.default, aten.permute_copy.default):
        return gv.permute(a[1])
    if t is aten.transpose.int:
        return gv.transpose(a[1], a[2])
    if t is aten.t.default:
        return gv.transpose(0, 1) if len(gv.dims) == 2 else gv
    if t in (aten.unsqueeze.default, aten.unsqueeze_copy.default):
        return gv.unsqueeze(a[1])
    if t is aten.squeeze.default:
        return gv.squeeze()
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        return gv.squeeze(a[1])
    if t is aten.slice.Tensor:
        dim = a[1] if len(a) > 1 else 0
        start = a[2] if len(a) > 2 else None
        end = a[3] if len(a) > 3 else None
        step = a[4] if len(a) > 4 else 1
        return gv.slice(dim, start, end, step)
    if t is aten.select.int:
        return gv.select(a[1], a[2])
    if t in VIEW_OPS:  # clone, alias, dtype casts: same logical elements
        return gv
    raise NotIndexable(f"{t} is not a view")


def split_over_axes(subdims: SubDims, axis_sizes):
    """Distribute one logical dim's sub-dims over the kernel axes merged into it (row-major)."""
    gv = GroupedView((subdims,))
    return gv.reshape(list(axis_sizes)).dims if axis_sizes else ()
