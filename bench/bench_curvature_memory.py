"""Peak extra memory of one curvature evaluation, per variant, at full width (CPU).

Two runs share one GPU on the cluster, so one evaluation's extra memory must be bounded. No
GPU is lent here: this measures the process's peak resident memory on the CPU instead (the
same tensors; the CUDA caching allocator rounds blocks up and keeps them reserved, so read
the GPU figure as "at least this"). Each variant runs in a fresh subprocess: the kernel's
high-water mark (VmHWM) is reset through ``/proc/self/clear_refs`` just before
``evaluate_curvature`` and read right after; extra = VmHWM - VmRSS before. The evaluation
uses the protocol's probe batch (128 images of 32 px, one chunk), ``--lanczos`` Lanczos steps
(not converged: a fixed, known number of stored vectors) and ``--probes`` trace probes, so
that the stored basis is known: ``j x P x 4`` bytes (float32 vectors). The graph of the
first-order gradient, reused by every HVP, is the rest.

    OMP_NUM_THREADS=1 python bench/bench_curvature_memory.py [--lanczos 4] [--probes 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = ("base", "bn_off", "narrow")  # adamw: the same network as base


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_one(variant: str, lanczos: int, probes: int) -> dict:
    import torch

    from deconcnn_cli.analysis import hessian
    from deconcnn_cli.config import load_run_config
    from deconcnn_cli.training.models import build_model

    torch.set_num_threads(1)
    cfg = load_run_config(variant=variant, flags={"device": "cpu"})
    torch.manual_seed(0)
    model = build_model(cfg.model, 10)
    x = torch.randn(128, 3, 32, 32)
    y = torch.randint(0, 10, (128,))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = _kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    res = hessian.evaluate_curvature(
        model,
        x,
        y,
        chunk_size=128,
        n_probes=probes,
        generator=torch.Generator().manual_seed(0),
        max_hvp=lanczos,
    )
    peak = _kb("VmHWM")
    return {
        "variant": variant,
        "width": cfg.model.width_mult,
        "n_params": n_params,
        "n_hvp": res.n_hvp,
        "extra_mib": (peak - before) / 1024,
        "basis_mib": lanczos * n_params * 4 / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lanczos", type=int, default=4)
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.lanczos, args.probes)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"one curvature evaluation: {args.lanczos} Lanczos vectors + {args.probes} probes")
    print(f"{'variant':<8}{'width':>6}{'params':>12}{'peak extra MiB':>16}{'of it basis':>13}")
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--one", variant, "--lanczos", str(args.lanczos)]
        cmd += ["--probes", str(args.probes)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"{variant}: {out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['variant']:<8}{r['width']:>6g}{r['n_params']:>12,}{r['extra_mib']:>16.0f}"
            f"{r['basis_mib']:>13.0f}"
        )


if __name__ == "__main__":
    main()
