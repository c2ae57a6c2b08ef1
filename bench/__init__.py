"""Benchmarks (python -m bench.NAME); each run's results in bench/results/, the summary in bench/RESULTS.md."""
