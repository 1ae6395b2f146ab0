"""The trainer's distributed init (issue 23): the backend follows the device the policy names, not what the host
has; NCCL gets the rank's own GPU; the collective timeout is the policy's, not torch's 10 minutes."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from daemon.jobs.trainer import process_group_options
from policies.train import TrainPolicy


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda:1", "nccl")])
def test_backend_and_device_follow_the_policys_device(device, backend):
    o = process_group_options(torch.device(device), 45)
    assert o["backend"] == backend
    assert o["device_id"] == (torch.device(device) if backend == "nccl" else None)
    assert o["timeout"] == timedelta(minutes=45)


def test_the_default_timeout_outlasts_torchs_and_a_cpu_group_starts_with_it(tmp_path):
    minutes = TrainPolicy().collective_timeout_min
    assert minutes > 10  # NCCL's default: ranks wait at a barrier while rank 0 evaluates and writes
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(**process_group_options(torch.device("cpu"), minutes), store=store, rank=0, world_size=1)
    try:
        assert dist.get_backend() == "gloo"
        t = torch.ones(3)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="collective_timeout_min"):
        TrainPolicy(collective_timeout_min=0)
