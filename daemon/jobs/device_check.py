"""`python -m daemon.jobs.device_check SPEC.json`: can the trainer's device run what the round asks (4-bit NF4)?

The daemon process has no torch, so before a qlora round takes any document it
starts this job on the trainer's device, like every other job (one spec in, one
result file out), and refuses the round with the cause it reports.
"""

from __future__ import annotations

import sys

from daemon.jobs.model_loader import ModelLoadError, four_bit_refusal, resolve_device
from daemon.jobs.specs import DeviceCheckSpec, write_result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m daemon.jobs.device_check SPEC.json")
    spec = DeviceCheckSpec.read(argv[0])
    try:
        device = resolve_device(spec.device)
        refusal = four_bit_refusal(device)
        where = str(device)
    except ModelLoadError as e:
        where, refusal = spec.device, str(e)
    import torch

    # The threads it computes with: what the launcher's OMP_NUM_THREADS (CPTD_TRAIN_CPU_THREADS) gave every job.
    write_result(spec.result_file, {"device": where, "refusal": refusal, "cpu_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
