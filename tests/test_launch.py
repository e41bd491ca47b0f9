"""Direct launches (flashlight/compiler/launch.py): a kernel launched before with the same argument signature
is launched through the compiled kernel Triton returned, skipping Triton's per-call binding.

The Triton interpreter returns no compiled kernel, so on CPU the direct path is exercised with a stand-in
that launches the interpreted kernel with every argument positional, as Triton's CompiledKernel[grid]
receives them: the generated kernels' argument order is what is under test there.
"""
import pytest
import torch

import flashlight
from flashlight.compiler import launch, runtime
from flashlight.harness import variant_registry as vr

from test_backward import VARIANT_SHAPES
from test_compiler import TOL, rel_err


class Recorder:
    def __init__(self):
        self.calls = []


class FakeCompiled:
    """Stands in for triton.compiler.CompiledKernel: [grid](*every argument, positional)."""
    packed_metadata = None

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        assert len(grid) == 3, "Triton's CompiledKernel[grid] takes three grid dims"

        def run(*args):
            self.log.calls.append(("direct", grid, args))
            return self.kernel.run_direct(grid, args)
        return run


class FakeKernel:
    """A JITFunction-like kernel: parameters a, b, n, BLOCK; records how it was launched."""
    __name__ = "fake_kernel"

    def __init__(self, arg_names=("a", "b", "n", "BLOCK")):
        self.arg_names = list(arg_names)
        self.log = Recorder()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.calls.append(("usual", grid, args, kwargs))
            return FakeCompiled(self, self.log)
        return run

    def run_direct(self, grid, args):
        return None


def kinds(kernel):
    return [c[0] for c in kernel.log.calls]


def test_same_signature_launches_directly_with_meta_parameters_in_order():
    k, launcher = FakeKernel(), launch.Launcher()
    a, b = torch.randn(8), torch.randn(8)
    for _ in range(3):
        launcher(k, (4,), [a, b], [16], {"BLOCK": 32}, {"num_warps": 4})
    assert kinds(k) == ["usual", "direct", "direct"]
    assert k.log.calls[1][1] == (4, 1, 1) and k.log.calls[1][2] == (a, b, 16, 32)
    assert launcher.direct_launches == 2


@pytest.mark.parametrize("change", ["int", "int_type", "misaligned", "dtype", "meta", "options"])
def test_a_changed_signature_launches_the_usual_way(change):
    k, launcher = FakeKernel(), launch.Launcher()
    buf = torch.randn(64, dtype=torch.float16)
    a, b, n, meta, opts = buf[:8], torch.randn(8), 16, {"BLOCK": 32}, {"num_warps": 4}
    launcher(k, (4,), [a, b], [n], meta, opts)
    if change == "int":
        n = 17                        # Triton specialises on divisibility by 16
    elif change == "int_type":
        n = 16.0
    elif change == "misaligned":
        a = buf[1:9]                  # 2 bytes past a 16-byte boundary
    elif change == "dtype":
        b = b.double()
    elif change == "meta":
        meta = {"BLOCK": 64}
    else:
        opts = {"num_warps": 8}
    launcher(k, (4,), [a, b], [n], meta, opts)
    launcher(k, (4,), [a, b], [n], meta, opts)
    assert kinds(k) == ["usual", "usual", "direct"]


def test_unknown_trailing_parameters_and_direct_off_always_launch_the_usual_way():
    k = FakeKernel(("a", "b", "n", "BLOCK", "EXTRA"))   # a parameter we do not pass (a default): not replayable
    launcher = launch.Launcher()
    for _ in range(2):
        launcher(k, (1,), [torch.randn(4), torch.randn(4)], [1], {"BLOCK": 16}, {})
    assert kinds(k) == ["usual", "usual"]
    k, launcher = FakeKernel(), launch.Launcher(direct=False)
    for _ in range(2):
        launcher(k, (1,), [torch.randn(4), torch.randn(4)], [1], {"BLOCK": 16}, {})
    assert kinds(k) == ["usual", "usual"]


def test_a_direct_launch_that_raises_launches_the_usual_way_from_then_on():
    class Broken(FakeCompiled):
        def __getitem__(self, grid):
            raise TypeError("a launcher of another signature")

    class Kernel(FakeKernel):
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.log.calls.append(("usual", grid, args, kwargs))
                return Broken(self, self.log)
            return run
    k, launcher = Kernel(), launch.Launcher()
    with pytest.warns(UserWarning, match="launch Triton's usual way"):
        for _ in range(3):
            launcher(k, (1,), [torch.randn(4), torch.randn(4)], [1], {"BLOCK": 16}, {})
    assert kinds(k) == ["usual", "usual", "usual"]
    assert not launcher.direct and "TypeError" in launcher.direct_failed


def test_a_kernel_that_does_not_come_back_compiled_is_not_kept():
    class Interpreted(FakeKernel):
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.log.calls.append(("usual", grid, args, kwargs))
                return None   # as the Triton interpreter
            return run
    k, launcher = Interpreted(), launch.Launcher()
    for _ in range(2):
        launcher(k, (1,), [torch.randn(4), torch.randn(4)], [1], {"BLOCK": 16}, {})
    assert kinds(k) == ["usual", "usual"]


@pytest.fixture
def interpreted_direct(monkeypatch):
    """Launches return a stand-in compiled kernel that runs the interpreted kernel positionally."""
    class Positional:
        packed_metadata = None

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            assert len(grid) == 3
            return lambda *args: self.kernel[grid](*args)

    def usual(kernel, grid, args, constexprs, options):
        kernel[grid](*args, **constexprs, **options)
        return Positional(kernel)
    monkeypatch.setattr(launch, "_launch", usual)


def direct_launches():
    return sum(r._launcher.direct_launches for r in runtime._REGISTRY.values())


@pytest.mark.parametrize("name", ["document_mask", "gqa", "alibi", "diff_attn"])
def test_training_steps_launched_directly_match_float64(name, interpreted_direct):
    """Forward, classification and both backward kernels replayed directly on the second step: every
    gradient still matches float64 autograd (the arguments reach the kernel in its parameters' order)."""
    v = vr.get(name)
    extra = {k: val for k, val in VARIANT_SHAPES.get(name, {}).items() if k in v.defaults}
    shape = v.shape(B=2, H=4, Sq=72, Sk=72, D=16, **extra)
    inputs = v.make_inputs(shape, torch.float32, "cpu", requires_grad=True, seed=torch.randint(0, 10**6, ()).item())
    fn = v.bind(shape)
    ref_inputs = {k: x.detach().double().requires_grad_(x.requires_grad) if x.is_floating_point() else x
                  for k, x in inputs.items()}
    ref = fn(**ref_inputs)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(grad_out)
    torch._dynamo.reset()
    # unequal tiles, so that meta-parameters given in the wrong order would show
    tiles = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    compiled = flashlight.compile(fn, config={**tiles, "backward": {"dq": tiles, "dkv": {**tiles, "BLOCK_M": 32,
                                                                                          "BLOCK_N": 16}}})
    for step in range(2):   # the first launches the usual way and keeps each compiled kernel
        before = direct_launches()
        for x in inputs.values():
            x.grad = None
        out = compiled(**inputs)
        out.backward(grad_out.float())
        assert rel_err(out, ref) < TOL
        for k, x in inputs.items():
            if x.requires_grad:
                assert rel_err(x.grad, ref_inputs[k].grad) < TOL, k
    assert flashlight.counters["fused_backward_launches"] > 0
    assert direct_launches() - before >= 3, "forward, dQ and dK/dV should all have launched directly"
