"""Ways to compute the curvature's Hessian-vector products, each timed in training steps.

On one model (ResNet-18 for CIFAR at ``--width``, 32 px, 128 images, 20 SGD steps from
initialisation so BN statistics are not trivial), side by side in one process on one thread:

- one training step (forward, backward, SGD update): the unit;
- the cached-graph HVP ``analysis.hessian.HessianOperator`` uses (reverse over reverse);
- the same graph with ``k`` probes at once (``is_grads_batched``: vmap over the double
  backward), per probe;
- forward over reverse (``torch.func.jvp`` of ``torch.func.grad``: no retained graph, the
  forward and backward recomputed per HVP);
- BatchNorm decomposed into plain ops, two ways (``mean`` + squared deviations;
  ``var_mean``), with the HVP's relative difference from the native one.

Also the share of one HVP spent in BatchNorm's double backward (torch profiler).

    python bench/bench_hvp_variants.py [--width 0.125]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from _common import median_time  # noqa: E402  (bench/ sibling)
from torch import nn
from torch.func import functional_call, grad, jvp

from deconcnn_cli.analysis import hessian
from deconcnn_cli.config import load_run_config
from deconcnn_cli.training.models import build_model


def bn_mean(self: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    c = x - mean
    var = (c * c).mean(dim=(0, 2, 3), keepdim=True)
    return torch.addcmul(
        self.bias[:, None, None], c * torch.rsqrt(var + self.eps), self.weight[:, None, None]
    )


def bn_var_mean(self: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
    scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
    return (x - mean) * scale + self.bias[:, None, None]


@contextlib.contextmanager
def batchnorm_as(model: nn.Module, forward: Callable) -> Iterator[None]:
    mods = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in mods:
        m.forward = forward.__get__(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=float, default=0.125)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_run_config(variant="base", flags={"model": {"width_mult": args.width}})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(20):
        step()
    t_step = median_time(step, 5, warmup=True)
    print(f"ResNet-18 width {args.width}, 128 images at 32 px, 1 thread; unit = one step")
    print(f"{'training step':<44}{t_step * 1e3:8.0f} ms   1.00")
    with hessian.preserved_model_state(model, train=True):
        op = hessian.HessianOperator(model, x, y, chunk_size=128)
        v = torch.randn(op.n_params)
        ref = op(v)
        t_hvp = median_time(lambda: op(v), 5, warmup=True)
        print(
            f"{'HVP, cached graph (the default)':<44}{t_hvp * 1e3:8.0f} ms   {t_hvp / t_step:.2f}"
        )
        sizes = [p.numel() for p in op.params]
        for k in (2, 4, 6):
            vs = torch.randn(k, op.n_params)

            def batched(vs: torch.Tensor = vs, k: int = k) -> object:
                pieces = vs.split(sizes, dim=1)
                return torch.autograd.grad(
                    [g for _, g in op._pairs],
                    op.params,
                    grad_outputs=[pieces[i].reshape(k, *g.shape) for i, g in op._pairs],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )

            t = median_time(batched, 3, warmup=True) / k
            print(
                f"{f'HVP, {k} probes batched, per probe':<44}{t * 1e3:8.0f} ms   {t / t_step:.2f}"
            )
        from torch.profiler import profile

        with profile() as prof:
            op(v)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        bn = sum(e.cpu_time_total for e in events if e.key == "NativeBatchNormBackwardBackward0")
        print(f"  share of one HVP in BatchNorm's double backward: {bn / total:.0%}")
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    tangent = {n: t.view_as(params[n]) for n, t in zip(names, v.split(sizes), strict=True)}

    def loss(p: dict, b: dict) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, b), (x,)), y)

    g = grad(loss, argnums=0)

    def forward_over_reverse() -> dict:
        # train-mode BN writes its buffers: fresh copies made inside the transformed function
        return jvp(
            lambda p: g(p, {n: b.clone() for n, b in buffers.items()}), (params,), (tangent,)
        )[1]

    t = median_time(forward_over_reverse, 3, warmup=True)
    out = torch.cat([forward_over_reverse()[n].reshape(-1) for n in names])
    diff = float((out - ref).norm() / ref.norm())
    print(
        f"{'HVP, forward over reverse (torch.func)':<44}{t * 1e3:8.0f} ms   {t / t_step:.2f}"
        f"   rel. diff {diff:.1e}"
    )
    for label, forward in (("mean", bn_mean), ("var_mean", bn_var_mean)):
        with batchnorm_as(model, forward), hessian.preserved_model_state(model, train=True):
            op_bn = hessian.HessianOperator(model, x, y, chunk_size=128)
            out = op_bn(v)
            t = median_time(lambda op_bn=op_bn: op_bn(v), 5, warmup=True)
            diff = float((out - ref).norm() / ref.norm())
            print(
                f"{f'HVP, BatchNorm decomposed ({label})':<44}{t * 1e3:8.0f} ms   "
                f"{t / t_step:.2f}   rel. diff {diff:.1e}"
            )
            del op_bn


if __name__ == "__main__":
    main()
