#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: `scripts/install.sh` (runtime) or `scripts/install.sh test`.
# Never pulls the CUDA torch build onto a machine without an NVIDIA driver.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=${1:-}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "install: no torch and no nvidia-smi -> CPU torch==2.13.0 first"
    "$PY" -m pip install "torch==2.13.0"
  fi
fi
target="."
[ "$extra" = "test" ] && target=".[test]"
# Skip the pip call when everything is already importable from this checkout.
if "$PY" - "$extra" <<'PYEOF' 2>/dev/null; then
import importlib, sys, pathlib
mods = ["torch", "hydra", "optuna", "pandas", "matplotlib", "rich", "variants", "flashlight.harness.variant_registry",
        "tabulate", "markdown", "nbformat", "nbclient", "ipykernel"]  # + the report's
if sys.argv[1:] == ["test"]:
    mods += ["pytest", "hypothesis", "transformers", "hydra_plugins.hydra_submitit_launcher", "psycopg2",  # + the cluster extra
             "hydra_plugins.hydra_optuna_sweeper"]
for m in mods:
    importlib.import_module(m)
import numpy  # the Triton interpreter needs numpy<2.4 (see pyproject's dependencies): pip fixes it
assert tuple(int(x) for x in numpy.__version__.split(".")[:2]) < (2, 4)
import variants
assert pathlib.Path(variants.__file__).resolve().parent == pathlib.Path("variants").resolve()
PYEOF
  echo "install: already installed"
else
  if "$PY" -c "import setuptools, wheel" 2>/dev/null; then nbi=--no-build-isolation; else nbi=; fi
  "$PY" -m pip install -q $nbi -e "$target"
fi
# Hydra's Optuna sweeper (tune=sweep) is tested too; its metadata pins optuna<3, which would downgrade
# optuna, but it runs with optuna 5: installed without its dependencies (all present by now)
if [ "$extra" = "test" ] && ! "$PY" -c "import hydra_plugins.hydra_optuna_sweeper" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps hydra-optuna-sweeper
fi
