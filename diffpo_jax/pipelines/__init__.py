"""Pipelines: multi-stage jobs built from the library (decoders, the record loop, data build), above it and
below the CLIs that run them (self_distill.py: `python -m diffpo_jax.data distill`)."""
