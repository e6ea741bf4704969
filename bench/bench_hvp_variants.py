"""Ways to compute the curvature's Hessian-vector products: cost in training steps, accuracy.

On one model (ResNet-18 for CIFAR at ``--width``, 32 px, 128 images, 20 SGD steps from
initialisation so BN statistics are not trivial), side by side in one process on one thread:

- one training step (forward, backward, SGD update): the unit;
- the cached-graph HVP with the native BatchNorm kernel (``plain_batchnorm=False``) and
  with train-mode BatchNorm from plain ops (``hessian.plain_batchnorm``: the default of
  ``HessianOperator``);
- the graph build, for each;
- the default graph with ``k`` probes at once (``is_grads_batched``: vmap over the double
  backward), per probe;
- forward over reverse (``torch.func.jvp`` of ``torch.func.grad``: no retained graph, the
  forward and backward recomputed per HVP);
- central finite differences of the gradient, ``(g(w + eps v) - g(w - eps v)) / (2 eps)``
  with ``eps = delta |w| / |v|``: two plain forward+backward passes and no graph, but the
  gradient of a ReLU network jumps wherever a unit crosses zero, so the quotient does not
  converge to the autograd HVP as ``delta`` shrinks (its float64 error is printed beside the
  float32 one: the error is the kinks', not rounding's).

Accuracy: each float32 HVP's relative distance from a float64 HVP (native BatchNorm) at the
same weights and vector; and the share of one native HVP spent in BatchNorm's double backward.

    python bench/bench_hvp_variants.py [--width 0.125]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _common import median_time  # noqa: E402  (bench/ sibling)
from torch.func import functional_call, grad, jvp

from deconcnn_cli.analysis import hessian
from deconcnn_cli.config import load_run_config
from deconcnn_cli.training.models import build_model


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
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))
    m64 = copy.deepcopy(model).double()
    with hessian.preserved_model_state(m64, train=True):
        exact = hessian.HessianOperator(m64, x.double(), y, chunk_size=128, plain_batchnorm=False)
        ref = exact(v.double())
        del exact

    def report(label: str, seconds: float, out: torch.Tensor | None = None) -> None:
        err = (
            ""
            if out is None
            else f"   vs float64 {float((out.double() - ref).norm() / ref.norm()):.1e}"
        )
        print(f"{label:<54}{seconds * 1e3:8.0f} ms   {seconds / t_step:5.2f}{err}")

    print(f"ResNet-18 width {args.width}, 128 images at 32 px, 1 thread; unit = one step")
    report("training step", t_step)
    for label, plain in (
        ("native BatchNorm", False),
        ("BatchNorm from plain ops (the default)", True),
    ):
        with hessian.preserved_model_state(model, train=True):

            def build(plain: bool = plain) -> hessian.HessianOperator:
                return hessian.HessianOperator(model, x, y, chunk_size=128, plain_batchnorm=plain)

            report(f"graph build, {label}", median_time(build, 3, warmup=True))
            op = build()
            report(f"HVP, {label}", median_time(lambda op=op: op(v), 5, warmup=True), op(v))
            if not plain:
                from torch.profiler import profile

                with profile() as prof:
                    op(v)
                events = prof.key_averages()
                total = sum(e.self_cpu_time_total for e in events)
                key = "NativeBatchNormBackwardBackward0"
                bn = sum(e.cpu_time_total for e in events if e.key == key)
                print(f"  share of that HVP in BatchNorm's double backward: {bn / total:.0%}")
            del op
    with hessian.preserved_model_state(model, train=True):
        op = hessian.HessianOperator(model, x, y, chunk_size=128)
        sizes = [p.numel() for p in op.params]
        for k in (2, 4, 6):
            vs = torch.randn(k, op.n_params)

            def batched(vs: torch.Tensor = vs, k: int = k, op=op) -> object:  # noqa: ANN001
                pieces = vs.split(sizes, dim=1)
                return torch.autograd.grad(
                    [g for _, g in op._pairs],
                    op.params,
                    grad_outputs=[pieces[i].reshape(k, *g.shape) for i, g in op._pairs],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )

            report(
                f"HVP, default, {k} probes batched, per probe",
                median_time(batched, 3, warmup=True) / k,
            )
        del op
    names = [name for name, _ in model.named_parameters()]
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    tangent = {name: t.view_as(params[name]) for name, t in zip(names, v.split(sizes), strict=True)}

    def loss(p: dict, b: dict) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, b), (x,)), y)

    g = grad(loss, argnums=0)

    def forward_over_reverse() -> dict:
        # train-mode BN writes its buffers: fresh copies made inside the transformed function
        return jvp(
            lambda p: g(p, {k: b.clone() for k, b in buffers.items()}), (params,), (tangent,)
        )[1]

    out = torch.cat([forward_over_reverse()[name].reshape(-1) for name in names])
    report(
        "HVP, forward over reverse (torch.func)",
        median_time(forward_over_reverse, 3, warmup=True),
        out,
    )
    for delta in (1e-1, 1e-3, 1e-5):
        fd32 = finite_difference_hvp(model, x, y, v, delta)
        fd64 = finite_difference_hvp(m64, x.double(), y, v.double(), delta).double()
        seconds = median_time(lambda d=delta: finite_difference_hvp(model, x, y, v, d), 3)
        report(f"HVP, central finite differences, delta {delta:.0e}", seconds, fd32)
        print(
            f"  the same in float64: vs float64 HVP {float((fd64 - ref).norm() / ref.norm()):.1e}"
        )


def finite_difference_hvp(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, delta: float
) -> torch.Tensor:
    """``(g(w + eps v) - g(w - eps v)) / (2 eps)``, ``eps = delta |w| / |v|``, train-mode BN
    (buffers restored), from two plain gradients at shifted copies of the parameters."""
    names = [name for name, _ in model.named_parameters()]
    w = [p.detach() for _, p in model.named_parameters()]
    eps = delta * float(torch.cat([t.reshape(-1) for t in w]).norm()) / float(v.norm())
    pieces = v.split([t.numel() for t in w])
    grads = []
    for sign in (1.0, -1.0):
        shifted = {
            n: (t + sign * eps * d.view_as(t)).requires_grad_(True)
            for n, t, d in zip(names, w, pieces, strict=True)
        }
        with hessian.preserved_model_state(model, train=True):
            loss = F.cross_entropy(functional_call(model, shifted, (x,)), y)
            g = torch.autograd.grad(loss, list(shifted.values()))
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    return (grads[0] - grads[1]) / (2 * eps)


if __name__ == "__main__":
    main()
