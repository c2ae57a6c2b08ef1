"""Benchmarks (python -m bench.NAME); results in bench/RESULTS.md."""
