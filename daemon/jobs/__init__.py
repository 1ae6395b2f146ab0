"""Torch child workloads: trainer, evaluator, drift probe. The daemon imports only `daemon.jobs.specs` (torch-free)."""
