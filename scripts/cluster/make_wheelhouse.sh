#!/usr/bin/env bash
# A wheelhouse of the project's dependencies for cluster nodes without network access.
# Run it where PyPI is reachable, copy DIR next to the checkout on the cluster, install from it there.
#
#   scripts/cluster/make_wheelhouse.sh [DIR] [extra requirement ...]      # DIR defaults to wheelhouse/
#   WHEELHOUSE_PYTHON=3.12 scripts/cluster/make_wheelhouse.sh wheelhouse  # the nodes' Python (default: this one's)
#   WHEELHOUSE_EXTRAS=cluster,test ...                                    # extras to include (default: cluster)
#
# It holds every dependency of pyproject.toml (and of the chosen extras) with their own dependencies, as
# binary wheels for CPython $WHEELHOUSE_PYTHON on manylinux x86_64 — except torch and triton: clusters
# provide those (a module, a container, a shared venv), and the CUDA build is gigabytes. To carry them
# too, name them: scripts/cluster/make_wheelhouse.sh wheelhouse "torch==2.11.0" "triton==3.6.0"
#
# The cluster extra brings hydra-submitit-launcher and submitit (with cloudpickle, typing_extensions): both
# launchers need them, hydra/launcher=slurm and hydra/launcher=gpus (every GPU of one host).
# On the node (offline), from the checkout, with torch already importable:
#   python -m pip install --no-index --find-links wheelhouse -e ".[cluster]"
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
dir=${1:-wheelhouse}; shift || true
pyver=${WHEELHOUSE_PYTHON:-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
extras=${WHEELHOUSE_EXTRAS:-cluster}
mkdir -p "$dir"

# the requirements: pyproject's dependencies + the extras (self-references such as flashlight[cluster]
# expanded), without torch/triton
mapfile -t reqs < <("$PY" - "$extras" <<'EOF'
import re, sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
name, optional = project["name"], project.get("optional-dependencies", {})
reqs, todo, seen = list(project["dependencies"]), [e for e in sys.argv[1].split(",") if e], set()
while todo:
    extra = todo.pop()
    if extra in seen:
        continue
    if extra not in optional:
        sys.exit(f"make_wheelhouse: no extra {extra!r} in pyproject.toml (known: {', '.join(optional)})")
    seen.add(extra)
    for r in optional[extra]:
        m = re.fullmatch(rf"{name}\[([\w,\s-]+)\]", r.strip())
        if m:
            todo += [e.strip() for e in m.group(1).split(",")]
        else:
            reqs.append(r)
for r in reqs:
    if re.match(r"(torch|triton)\b", r):
        continue
    print(r.split(";")[0].strip())  # markers are for the build machine's platform, not the node's
EOF
)
echo "make_wheelhouse: ${reqs[*]} $* (CPython $pyver, manylinux x86_64) -> $dir"

# sdist-only dependencies (pure Python) are built into wheels here
"$PY" -m pip wheel -q --no-deps -w "$dir" "antlr4-python3-runtime==4.9.3"
# setuptools and wheel: `pip install -e .` on the node builds the project from these
"$PY" -m pip download -q --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform linux_x86_64 --find-links "$dir" -d "$dir" "${reqs[@]}" "setuptools>=64" wheel "$@"
n=$(ls "$dir"/*.whl | wc -l)
echo "make_wheelhouse: $n wheels, $(du -sh "$dir" | cut -f1) in $dir"
echo "on the node:  python -m pip install --no-index --find-links $dir -e \".[$extras]\""
