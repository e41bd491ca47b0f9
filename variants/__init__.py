"""Attention variants written in plain PyTorch, one per file (see flashlight/variant_registry.py)."""
