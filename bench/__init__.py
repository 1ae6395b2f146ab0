"""Benchmarks and the deterministic corpora they (and some tests) share."""
