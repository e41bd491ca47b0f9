"""Compile generated kernels for sm_90 (run by test_hopper_compile.py in a process of its own: the Triton
interpreter patches triton.language in the test's process). Reads jobs as JSON on stdin, prints
[[kernel, shared memory bytes], ...] as JSON; a job with "ptxas": true also gets ptxas's registers per thread
and spill stores and loads in bytes (scripts/register_audit.py)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def ptxas_usage(ptx: str) -> list:
    """[registers, spill store bytes, spill load bytes] of a kernel, as Triton's own ptxas reports them."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    return [int(re.search(pattern, info).group(1)) for pattern in
            (r"Used (\d+) registers", r"(\d+) bytes spill stores", r"(\d+) bytes spill loads")]


def main():
    out = []
    for i, job in enumerate(json.loads(sys.stdin.read())):
        spec = importlib.util.spec_from_file_location(f"hopper_{i}", job["path"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        attrs = {(a,): [["tt.divisibility", 16]] for a in job.get("divisible", [])}
        src = ASTSource(getattr(module, job["name"]), job["signature"], job["constexprs"], attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=job["options"])
        row = [job["name"], compiled.metadata.shared]
        if job.get("ptxas"):
            row += ptxas_usage(compiled.asm["ptx"])
        out.append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
