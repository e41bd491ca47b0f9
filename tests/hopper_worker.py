"""Compile generated kernels for sm_90 (run by test_hopper_compile.py in a process of its own: the Triton
interpreter patches triton.language in the test's process). Reads jobs as JSON on stdin, prints
[[kernel, shared memory bytes], ...] as JSON."""
import importlib.util
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def main():
    out = []
    for i, job in enumerate(json.loads(sys.stdin.read())):
        spec = importlib.util.spec_from_file_location(f"hopper_{i}", job["path"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        src = ASTSource(getattr(module, job["name"]), job["signature"], job["constexprs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=job["options"])
        out.append([job["name"], compiled.metadata.shared])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
