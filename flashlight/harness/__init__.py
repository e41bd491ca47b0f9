"""The research harness: the variants' registry and the benchmark/correctness runner.

    variant_registry - how a variant (variants/*.py) is found, bound to a shape and given inputs
    run              - one variant, several backends, one results table (``python -m flashlight.run``)
"""
