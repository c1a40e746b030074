"""Benchmarks: baselines and graphopt pipelines side by side in one process (``python -m bench.run``)."""
