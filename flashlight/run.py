"""``python -m flashlight.run ...``: the benchmark runner (flashlight/harness/run.py) under its usual name."""
import sys

from flashlight.harness.run import main, quote_bool_overrides

if __name__ == "__main__":
    # main is flashlight.harness.run.main, an importable function and not a __main__ copy: a Slurm job
    # (hydra/launcher=slurm) gets the task function pickled by reference to its module.
    sys.argv = quote_bool_overrides(sys.argv)
    main()
