"""Compile generated kernels for a Hopper GPU (sm_90) on a machine without one, as Triton's JIT would compile
their launches: shared by tests/test_hopper_compile.py and scripts/register_audit.py (no pytest here). The
compile runs in a process of its own (hopper_worker.py): the Triton interpreter, which runs the kernels on
the CPU first, patches triton.language in this one."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

H100_SHARED = 232448   # bytes of shared memory a block may use on sm_90
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}


class Recorder:
    """A kernel module whose kernels record each launch (the source, the kernel, its arguments), then run."""

    def __init__(self, module, source, launches):
        self._module, self._source, self._launches = module, source, launches

    def __getattr__(self, name):
        kernel = getattr(self._module, name)
        if not hasattr(kernel, "__getitem__"):
            return kernel

        class Launcher:
            def __getitem__(_, grid):
                def launch(*args, **kwargs):
                    self._launches.append((self._source, name, args, kwargs))
                    return kernel[grid](*args, **kwargs)
                return launch
        return Launcher()


def launch_signature(source, name, args, kwargs):
    """The kernel's argument types and constexprs for a launch, from its parameters in the source, specialised
    as Triton's JIT specialises a launch: an integer equal to 1 becomes the constant 1, and an integer divisible
    by 16 or a 16-byte aligned tensor is marked so (their indices, the third value returned). Without these the
    compile would be another one than the GPU's: with strides unknown, no vectorised loads, no pipelining (and
    a quarter of the shared memory)."""
    header = re.search(rf"def {name}\((.*?)\):", source, re.S).group(1)
    params = [p.strip() for p in header.split(",") if p.strip()]
    values = dict(zip([p.split(":")[0] for p in params], args)) | kwargs
    signature, constexprs, divisible = {}, {}, []
    for i, p in enumerate(params):
        pname, v = p.split(":")[0].strip(), values[p.split(":")[0].strip()]
        if "constexpr" in p:
            signature[pname], constexprs[pname] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[pname] = "*" + _TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                divisible.append(i)
        elif isinstance(v, bool):
            signature[pname] = "i1"
        elif isinstance(v, int) and v == 1:
            signature[pname], constexprs[pname] = "constexpr", 1
        elif isinstance(v, int):
            signature[pname] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                divisible.append(i)
        else:
            signature[pname] = "fp32"
    return signature, constexprs, divisible


def compile_for_hopper(directory, launches, ptxas=False):
    """Compile each distinct launch for sm_90 in a fresh process (the interpreter has patched triton.language
    in this one): [(job, [kernel, shared memory bytes] (+ [registers, spill store bytes, spill load bytes]
    with `ptxas`))]. A compile error raises with Triton's message."""
    jobs, seen = [], set()
    for source, name, args, kwargs in launches:
        signature, constexprs, divisible = launch_signature(source, name, args, kwargs)
        options = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
        key = (source, name, json.dumps([signature, constexprs, divisible, options], sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        path = Path(directory) / f"{name}_{len(jobs)}.py"
        path.write_text(source)
        jobs.append({"path": str(path), "name": name, "signature": signature, "constexprs": constexprs,
                     "divisible": divisible, "options": options, "ptxas": ptxas})
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("hopper_worker.py"))], input=json.dumps(jobs),
                          capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return list(zip(jobs, json.loads(done.stdout.strip().splitlines()[-1])))


def record_gpu_launches(patch=setattr) -> list:
    """Make flashlight's runtime pick the tiles a GPU would (runtime.default_config / backward_config for
    "cuda") and record every kernel launch (source, kernel, arguments) before running it; returns the list it
    fills. `patch(object, name, value)`: setattr, or pytest's monkeypatch.setattr to undo it after a test."""
    from flashlight.compiler import runtime

    launches = []
    forward, backward, load = runtime.default_config, runtime.backward_config, runtime.load_source
    patch(runtime, "default_config", lambda ks, device_type: forward(ks, "cuda"))
    patch(runtime, "backward_config", lambda bs, device_type, given=None: backward(bs, "cuda", given))
    patch(runtime, "load_source",
          lambda source, name, dump_dir=None: Recorder(load(source, name, dump_dir), source, launches))
    return launches
