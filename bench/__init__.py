"""Benchmarks: each prints ours vs a named baseline, as a ratio, in one run."""
