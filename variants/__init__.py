"""Attention variants written in plain PyTorch, one per file (see flashlight/harness/variant_registry.py)."""
