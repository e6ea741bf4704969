"""The short run of ``decon validate``, in its own process: train, then report peak memory.

``python -m deconcnn_cli.sweep.validate_probe CONFIG_JSON RUN_DIR STEPS REPORT_JSON``. The
parent measures this process's peak RSS itself (``wait4``); on a GPU this writes
``torch.cuda.max_memory_allocated`` (training and the step-0 curvature evaluation), the peak
reserved memory, the CUDA context's own footprint and the card's size to REPORT_JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GB = 1024**3


def main(argv: list[str]) -> int:
    import torch

    from deconcnn_cli.config import RunConfig
    from deconcnn_cli.fileio import atomic_write_json
    from deconcnn_cli.training.data import load_splits
    from deconcnn_cli.training.device import resolve_device
    from deconcnn_cli.training.loop import train_run
    from deconcnn_cli.training.rundir import own_run, prepare_run_dir

    config_path, run_dir, steps, report = Path(argv[0]), Path(argv[1]), int(argv[2]), argv[3]
    cfg = RunConfig.model_validate(json.loads(config_path.read_text()))
    device = resolve_device(cfg.device)
    out: dict[str, float | None] = {}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)  # creates the context; nothing allocated
        out["cuda_context_gb"] = (total - free) / GB  # context (+ anything else on the card)
        out["cuda_total_gb"] = total / GB
        torch.cuda.reset_peak_memory_stats(device)
    prepare_run_dir(cfg, run_dir)
    with own_run(run_dir):
        result = train_run(cfg, run_dir, threads=1, stop_after_steps=steps)
    if device.type == "cuda":
        out["cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / GB
        out["cuda_peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
    out["steps_done"] = result.steps_done
    d = cfg.data  # the validation split's size: a pass's cost scales to CIFAR-10's 5,000
    out["n_val"] = load_splits(
        d.dataset, d.data_dir, val_fraction=d.val_fraction, split_seed=d.split_seed,
        image_size=d.image_size, download=False, device=torch.device("cpu"),
    ).n_val  # fmt: skip
    atomic_write_json(Path(report), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
