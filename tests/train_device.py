"""The device the distributed training tests name in their specs (issue 23): one place, so they run unchanged
where CUDA is visible.

The trainer takes its device, and with it the collective backend (trainer.process_group_options: cuda -> nccl,
cpu -> gloo), from the spec's `train.device`, never from what the host happens to have. A test that left it at
"auto" would train on whatever GPU is there; these name it. NCCL binds one rank to one GPU, so a run of N ranks
is on CUDA only where the host has N GPUs, and on CPU with gloo otherwise (a one-GPU host, this project's CI).
"""

from __future__ import annotations

import torch


def train_device(ranks: int) -> str:
    """`train.device` for a run of `ranks` processes on this host."""
    return "cuda" if torch.cuda.device_count() >= ranks else "cpu"
