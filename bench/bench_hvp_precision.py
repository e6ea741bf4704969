"""HVP precision (``analysis.hvp_precision``): accuracy of fp16/bf16 autocast Hessian-vector
products against a float64 reference, on the CPU, on the tests' small models.

For each model (ResNet-18 at ``--width``, base and bn_off, at initialisation and after
``--train`` SGD steps on the digits at 16 px), on one 128-image probe batch:

- one HVP of a fixed random vector in fp32, fp16 and bf16 autocast: its relative error
  ``|Hv - H64 v| / |H64 v|`` against the float64 model's, and its time against the fp32 one
  (on a CPU fp16 autocast is emulated: the time says nothing of a GPU's tensor cores);
- the curvature evaluation itself (``evaluate_curvature``, the run's settings: Lanczos tol
  1e-2, 6 deflated Hutchinson probes from the same generator state) in each precision:
  ``lambda_max``'s relative error against the float64 evaluation (tolerance: the Lanczos
  tol, 1e-2), and the trace's error in units of its own standard error (within 1 SEM: the
  precision adds less than the estimator's own noise).

    python bench/bench_hvp_precision.py [--width 0.125] [--train 60]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from deconcnn_cli.analysis import hessian
from deconcnn_cli.config import load_run_config
from deconcnn_cli.training.data import load_splits, normalize, steps_per_epoch, train_batch
from deconcnn_cli.training.models import build_model

PRECISIONS = ("fp32", "fp16", "bf16")


def curvature(model: torch.nn.Module, x, y, precision: str) -> hessian.CurvatureResult:
    return hessian.evaluate_curvature(
        model, x, y, chunk_size=128, n_probes=6, generator=torch.Generator().manual_seed(7),
        tol=1e-2, max_hvp=40, precision=precision,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--train", type=int, default=60, help="SGD steps before 'trained'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"ResNet-18 width {args.width}, digits at 16 px, probe batch 128, 1 thread")
    print(
        f"{'model':<18}{'prec':<6}{'HVP rel err':>12}{'HVP time':>10}"
        f"{'lmax rel err':>14}{'trace err/SEM':>15}"
    )
    for variant in ("base", "bn_off"):
        cfg = load_run_config(
            variant=variant,
            overrides=["data.image_size=16", 'data.dataset="digits"', 'device="cpu"'],
            flags={"model": {"width_mult": args.width}},
        )
        d = cfg.data
        splits = load_splits(
            "digits", None, val_fraction=d.val_fraction, split_seed=d.split_seed,
            image_size=16, download=False, device=torch.device("cpu"),
        )  # fmt: skip
        spe = steps_per_epoch(splits.n_train, 128)
        torch.manual_seed(0)
        model = build_model(cfg.model, splits.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x = normalize(splits.train_x[:128], splits.mean, splits.std)
        y = splits.train_y[:128]
        for stage in ("init", "trained"):
            if stage == "trained":
                for step in range(args.train):
                    bx, by = train_batch(
                        splits, step=step, steps_per_epoch=spe, batch_size=128, seed=0,
                        augment=True, image_size=16,
                    )  # fmt: skip
                    opt.zero_grad()
                    F.cross_entropy(model(bx), by).backward()
                    opt.step()
            m64 = copy.deepcopy(model).double()
            n = sum(p.numel() for p in model.parameters())
            v = torch.randn(n, generator=torch.Generator().manual_seed(1))
            with hessian.preserved_model_state(m64, train=True):
                ref_hv = hessian.HessianOperator(m64, x.double(), y, chunk_size=128)(v.double())
            ref = curvature(m64, x.double(), y, "fp32")
            t32 = None
            for p in PRECISIONS:
                with hessian.preserved_model_state(model, train=True):
                    op = hessian.HessianOperator(model, x, y, chunk_size=128, precision=p)
                    op(v)
                    t0 = time.perf_counter()
                    hv = op(v)
                    seconds = time.perf_counter() - t0
                    del op
                t32 = t32 or seconds
                err = float((hv.double() - ref_hv).norm() / ref_hv.norm())
                res = curvature(model, x, y, p)
                lerr = abs(res.lambda_max - ref.lambda_max) / abs(ref.lambda_max)
                terr = abs(res.hutch_trace - ref.hutch_trace) / ref.hutch_trace_sem
                print(
                    f"{variant + ' ' + stage:<18}{p:<6}{err:>12.1e}{seconds / t32:>9.1f}x"
                    f"{lerr:>14.1e}{terr:>15.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
