"""Does one HVP get cheaper, in training steps, as the model widens?

ResNet-18 for CIFAR at each ``--widths`` (random data, 128 images at 32 px, one thread), side
by side in one process: one training step (forward, backward, SGD with momentum), one
forward+backward pass without the update, the curvature graph build and one cached-graph HVP
(``hessian.HessianOperator``, the run's defaults), each as a multiple of the step. The
benches judge the overhead at width 0.125; this shows whether full width would change it.

    python bench/bench_hvp_width.py [--widths 0.125,0.25,0.5,1.0]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import median_time  # noqa: E402  (bench/ sibling)

from deconcnn_cli.analysis import hessian
from deconcnn_cli.config import load_run_config
from deconcnn_cli.training.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--widths", default="0.125,0.25,0.5,1.0")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("ResNet-18, 128 images at 32 px, 1 thread; unit = one training step")
    for width in (float(w) for w in args.widths.split(",")):
        measure_width(width)


def measure_width(width: float) -> None:
    cfg = load_run_config(variant="base", flags={"model": {"width_mult": width}})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = list(model.parameters())

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def forward_backward() -> None:
        with hessian.preserved_model_state(model, train=True):
            torch.autograd.grad(F.cross_entropy(model(x), y), params)

    reps = 3 if width < 0.5 else 1
    t_step = median_time(step, reps, warmup=True)
    t_fb = median_time(forward_backward, reps)
    with hessian.preserved_model_state(model, train=True):
        t0 = time.perf_counter()
        op = hessian.HessianOperator(model, x, y, chunk_size=128)
        t_build = time.perf_counter() - t0
        v = torch.randn(op.n_params)
        t_hvp = median_time(lambda: op(v), reps, warmup=True)
    n = sum(p.numel() for p in params)
    print(
        f"width {width:<6} {n / 1e6:6.2f}M parameters: step {t_step * 1e3:7.0f} ms;"
        f" forward+backward {t_fb / t_step:.2f}, graph build {t_build / t_step:.2f},"
        f" HVP {t_hvp / t_step:.2f} steps",
        flush=True,
    )


if __name__ == "__main__":
    main()
