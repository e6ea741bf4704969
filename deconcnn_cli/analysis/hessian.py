"""Curvature of the mean cross-entropy: Hessian-vector products, lambda_max, Hutchinson trace.

Pure functions (no I/O, no printing). The Hessian is that of the mean cross-entropy of a
fixed probe batch (no weight-decay term) w.r.t. every trainable parameter, with the model in
train mode (BatchNorm uses per-chunk batch statistics), fp32 without autocast. The
first-order graph is built once per evaluation and reused by every HVP.

``lambda_max`` comes from a warm-started Lanczos run (:mod:`.lanczos`) that stops on an
a-posteriori error bound; the trace is ``tr(Q^T H Q)`` over its Krylov basis ``Q`` (exact,
free) plus Hutchinson on the deflated operator ``(I - QQ^T) H (I - QQ^T)``. One concern
(the Hessian operator and the two estimators that share its graph and its basis), hence one
file of about 500 lines.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import t as student_t
from torch import nn

from deconcnn_cli.analysis.lanczos import (
    DEFAULT_GAP_CAP,
    DEFAULT_MAX_HVP,
    DEFAULT_TOL,
    HVPOperator,
    LanczosResult,
    dot64,
    lanczos_top,
)
from deconcnn_cli.analysis.progress import STILL_WORKING, ProgressFn, checked_graph, report

HVP_PRECISIONS = ("fp32", "fp16", "bf16")  # HessianOperator's precision (analysis.hvp_precision)
DEFAULT_DEFLATE = True  # deflate the trace with the Lanczos Krylov basis (measured: docs/)
# A warm evaluation (a previous eigenvector given) trusts the Ritz gap up to 10 x tol of
# |theta|: it stops once r <= sqrt(10 tol) |theta| (~3.2 tol, so the rigorous residual bound
# stays within a few tol) when the Ritz gap is that wide. A cold start keeps the 0.3% cap:
# from a random start a hidden near partner of lambda_max is likely (measured: docs/).
WARM_GAP_CAP_PER_TOL = 10.0
_ORTHONORMAL_ATOL = {torch.float32: 1e-5, torch.float64: 1e-6}  # Gram matrix vs identity

EigenResult = LanczosResult  # top Hessian eigenvalue (see :mod:`.lanczos`)


@dataclass(frozen=True)
class TraceResult:
    """Hutchinson trace estimate, its standard error and the half-width of its 95% interval
    (Student t with ``m - 1`` degrees of freedom); NaN and ``reason`` on failure."""

    mean: float
    sem: float
    ci95: float
    n_hvp: int
    reason: str


@dataclass(frozen=True)
class CurvatureResult:
    """One curvature evaluation (logged every 500 steps)."""

    lambda_max: float
    hutch_trace: float
    hutch_trace_sem: float
    hutch_trace_ci95: float  # half-width of the 95% interval: t(0.975, m - 1) x sem
    n_hvp: int
    eigenvector: torch.Tensor | None  # top Ritz vector: next warm start; None if non-finite
    reason: str  # "" on success, else why some values are NaN


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, *, train: bool | None = None) -> Iterator[nn.Module]:
    """Snapshot buffers, every submodule's train/eval flag and ``.grad``; restore on exit.

    Parameters
    ----------
    model : nn.Module
        Its buffers (BatchNorm ``running_mean``, ``running_var``, ``num_batches_tracked``)
        are cloned on entry and copied back bit-exactly on exit; each parameter's ``.grad``
        reference (tensor or None) is put back. Parameters themselves are never written.
    train : bool or None
        If not None, ``model.train(train)`` is called on entry.

    Yields
    ------
    nn.Module
        The same model.
    """
    modes = [(module, module.training) for module in model.modules()]
    buffers = [(buf, buf.detach().clone()) for buf in model.buffers()]
    grads = [(param, param.grad) for param in model.parameters()]
    try:
        if train is not None:
            model.train(train)
        yield model
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        for param, grad in grads:
            param.grad = grad
        for module, mode in modes:
            module.training = mode


class HessianOperator:
    """Hessian-vector products of the mean cross-entropy on a fixed batch.

    The constructor runs the forward pass and ``torch.autograd.grad(..., create_graph=True)``
    once; each call is one backward through that graph (``.grad`` is never touched). The
    forward may update BN buffers: use it inside ``preserved_model_state(model, train=True)``.

    With ``plain_batchnorm`` (default) every affine BatchNorm in train mode is computed, for
    this forward only, from plain ops (:func:`plain_batchnorm`): the same function, whose
    double backward is cheaper and more accurate than the native kernel's (measured in
    docs/performance.md, "Analysis metrics overhead", `bench/bench_hvp_variants.py`).

    Parameters
    ----------
    model : nn.Module
        Eager (not compiled) model, used in its current mode.
    inputs, targets : torch.Tensor
        Probe batch, moved to the parameters' device (floating inputs also to their dtype).
    chunk_size : int
        Forward in chunks of this many examples (the training batch size, so train-mode BN
        sees batches like SGD's); loss = chunk mean losses weighted by chunk size.
    plain_batchnorm : bool
        Compute train-mode BatchNorm from plain ops for the graph (see above).
    precision : str
        ``fp32`` (default): the graph and every product in the parameters' dtype, autocast
        off. ``fp16``/``bf16``: the forward graph and the products under autocast to that
        dtype (the tensor-core precision of training on a GPU); vectors, products and every
        dot product stay in float32/float64. Accuracy and cost: docs/performance.md, "HVP
        precision".
    progress : callable, optional
        Called from the forward and from hooks on every module's output, in the graph build
        and in every product (:func:`.progress.checked_graph`): a True answer raises
        :class:`.progress.EvaluationStopped` within a fraction of one product.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        chunk_size: int,
        plain_batchnorm: bool = True,
        precision: str = "fp32",
        progress: ProgressFn | None = None,
    ) -> None:
        if precision not in HVP_PRECISIONS:
            raise ValueError(f"precision must be one of {HVP_PRECISIONS}, got {precision!r}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params or not self.params[0].dtype.is_floating_point:
            raise ValueError("model needs trainable floating-point parameters")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if inputs.shape[0] == 0 or inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs/targets lengths {inputs.shape[0]}/{targets.shape[0]}")
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        self.n_params = sum(p.numel() for p in self.params)
        self.n_hvp = 0
        inputs, targets = _to_device(inputs, self.device, self.dtype), targets.to(self.device)
        n_total = inputs.shape[0]
        plain = plain_batchnorm_forward(model) if plain_batchnorm else contextlib.nullcontext()
        self._autocast = functools.partial(
            torch.autocast,
            self.device.type,
            dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
            enabled=precision != "fp32",
        )
        with torch.enable_grad(), self._autocast(), plain, checked_graph(model, progress):
            loss = torch.zeros((), device=self.device, dtype=self.dtype)
            for start in range(0, n_total, chunk_size):
                x, y = inputs[start : start + chunk_size], targets[start : start + chunk_size]
                loss = loss + F.cross_entropy(model(x).to(self.dtype), y) * (x.shape[0] / n_total)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.loss = float(loss.detach())
        self._pairs = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        # the first-order gradient itself, free here: a Lanczos start that leans on the top
        # of the spectrum (docs/metrics-curvature-noise.md, "Start vector")
        self.gradient = _flatten([None if g is None else g.detach() for g in grads], self.params)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``H @ v`` for a flat vector ``v`` of length ``n_params``."""
        if v.shape != (self.n_params,):
            raise ValueError(f"v must have shape ({self.n_params},), got {tuple(v.shape)}")
        pieces = v.to(device=self.device, dtype=self.dtype).split([p.numel() for p in self.params])
        self.n_hvp += 1
        if not self._pairs:
            return torch.zeros(self.n_params, device=self.device, dtype=self.dtype)
        with self._autocast():
            hv = torch.autograd.grad(
                [g for _, g in self._pairs],
                self.params,
                grad_outputs=[pieces[i].view_as(g) for i, g in self._pairs],
                retain_graph=True,
                allow_unused=True,
            )
        return _flatten(hv, self.params)


def plain_batchnorm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Train-mode BatchNorm from plain ops: the centred input ``c = x - mean``, the biased
    variance ``mean(c^2)`` (as ``F.batch_norm`` normalises), then ``c * weight / sqrt(var +
    eps) + bias``, per channel. The running statistics are not updated (the curvature
    restores them anyway)."""
    dims = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    c = x - x.mean(dim=dims, keepdim=True)
    var = c.square().mean(dim=dims, keepdim=True)
    return c * (module.weight.view(shape) * torch.rsqrt(var + module.eps)) + module.bias.view(shape)


@contextlib.contextmanager
def plain_batchnorm_forward(model: nn.Module) -> Iterator[None]:
    """Inside the block, every affine BatchNorm of ``model`` in train mode runs
    :func:`plain_batchnorm` (hooks still run); the modules are restored on exit."""
    patched = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.affine
        and "forward" not in vars(m)
    ]
    for m in patched:
        m.forward = plain_batchnorm.__get__(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def top_hessian_eigenvalue(
    hvp: HVPOperator,
    *,
    v0: torch.Tensor | np.ndarray | None = None,
    tol: float = DEFAULT_TOL,
    max_hvp: int = DEFAULT_MAX_HVP,
    gap_cap: float = DEFAULT_GAP_CAP,
    progress: ProgressFn | None = None,
) -> EigenResult:
    """Largest algebraic eigenvalue by Lanczos with full reorthogonalisation.

    Parameters
    ----------
    hvp : HVPOperator
        Hessian-vector product; the Lanczos vectors are float64 on ``hvp.device``.
    v0 : tensor or array, optional
        Warm start (the previous eigenvector); ignored if zero or non-finite. Without it a
        fixed-seed Gaussian vector is used, so results are deterministic.
    tol : float
        Relative accuracy: stop when the a-posteriori bound ``min(r, r**2 / gap)`` on
        ``|theta - lambda|`` is at most ``tol * |theta|`` (:mod:`.lanczos`).
    max_hvp : int
        HVP cap; reaching it returns ``value`` NaN with a reason (the Ritz vector and the
        Krylov basis are still returned).
    gap_cap : float
        The Ritz gap is trusted up to this fraction of ``|theta|`` (:mod:`.lanczos`).
    progress : callable, optional
        Told ``("lanczos", done, max_hvp)`` before each product (:mod:`.progress`).

    Returns
    -------
    EigenResult
        A :class:`~deconcnn_cli.analysis.lanczos.LanczosResult`.
    """
    return lanczos_top(hvp, v0=v0, tol=tol, max_hvp=max_hvp, gap_cap=gap_cap, progress=progress)


def hutchinson_trace(
    hvp: HVPOperator,
    *,
    n_probes: int,
    generator: torch.Generator,
    deflation_vectors: torch.Tensor | Sequence[torch.Tensor] | None = None,
    deflation_values: Sequence[float] | None = None,
    progress: ProgressFn | None = None,
) -> TraceResult:
    """Hutchinson trace from a fixed number of Rademacher probes, optionally deflated.

    With orthonormal columns ``Q`` (shape ``(n_params, r)``) and their Rayleigh quotients
    ``q_i^T H q_i`` (``deflation_values``; for a Lanczos basis the diagonal of ``T``) the
    estimate is ``sum(deflation_values) + mean_j w_j^T H w_j`` with ``w_j = (I - QQ^T) z_j``.
    Since ``tr H = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T))`` for any orthonormal ``Q``, and
    ``E[z z^T] = I``, it is unbiased for any ``Q`` chosen independently of the probes, and of
    lower variance when ``Q`` spans the dominant eigenvectors (Hutch++-style deflation).

    Parameters
    ----------
    hvp : HVPOperator
        Hessian-vector product.
    n_probes : int
        Number ``m >= 2`` of probes, one HVP each.
    generator : torch.Generator
        Source of the probes (drawn on its device): same state, same estimate.
    deflation_vectors, deflation_values : optional
        Both or neither. The vectors: an ``(n_params, r)`` matrix or a sequence of ``r``
        1-D vectors (a Lanczos ``basis``, never stacked); the projection is done in their
        dtype, one vector at a time.
    progress : callable, optional
        Told ``("probes", done, n_probes)`` before each product and at the end
        (:mod:`.progress`); a True answer abandons the estimate.

    Returns
    -------
    TraceResult
        ``sem = std(samples, ddof=1) / sqrt(m)``, the standard error of the Hutchinson part
        (the deflated part is exact); ``ci95 = t(0.975, m - 1) * sem``: with few probes the
        sem itself is uncertain (its relative sd is about ``1 / sqrt(2 (m - 1))``), which
        the t quantile accounts for (4.30 at m = 3, 2.26 at m = 10, against 1.96). NaN with
        a reason on non-finite products.
    """
    if n_probes < 2:
        raise ValueError(f"n_probes must be >= 2 (the standard error needs it), got {n_probes}")
    basis, offset = _deflation(hvp, deflation_vectors, deflation_values, progress)
    samples = []
    with torch.autocast(hvp.device.type, enabled=False):
        for i in range(n_probes):
            report(progress, "probes", i, n_probes)
            # int8: the values and the generator's state of an int64 draw, 1/8 of the bytes
            # to make and copy; 2z - 1 in the probe's dtype on the operator's device
            on = {"generator": generator, "device": generator.device, "dtype": torch.int8}
            bits = torch.randint(0, 2, (hvp.n_params,), **on)
            z = bits.to(hvp.device).to(basis[0].dtype if basis else torch.float64).mul_(2).sub_(1)
            coeffs = [dot64(b, z).to(z.dtype) for b in basis or ()]  # z <- (I - QQ^T) z
            for b, c in zip(basis or (), coeffs, strict=True):
                z.sub_(b * c)
            hz = hvp(z.to(hvp.dtype)).detach().to(z.dtype)
            samples.append(dot64(z, hz))
    report(progress, "probes", n_probes, n_probes)
    values = torch.stack(samples).cpu().numpy()
    if not np.all(np.isfinite(values)):
        nan = math.nan
        return TraceResult(nan, nan, nan, n_probes, "non-finite Hessian-vector product")
    sem = float(values.std(ddof=1) / math.sqrt(n_probes))
    ci95 = float(student_t.ppf(0.975, n_probes - 1)) * sem
    mean = offset + float(values.mean())
    return TraceResult(mean=mean, sem=sem, ci95=ci95, n_hvp=n_probes, reason="")


def evaluate_curvature(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int,
    n_probes: int,
    generator: torch.Generator,
    v0: torch.Tensor | np.ndarray | None = None,
    tol: float = DEFAULT_TOL,
    max_hvp: int = DEFAULT_MAX_HVP,
    deflate: bool = DEFAULT_DEFLATE,
    precision: str = "fp32",
    progress: ProgressFn | None = None,
) -> CurvatureResult:
    """``lambda_max`` and Krylov-deflated Hutchinson trace; the model is left as found.

    Train mode, one first-order graph shared by Lanczos and Hutchinson, then buffers, modes
    and ``.grad`` restored. Numerical failure gives NaN and a reason, never an exception;
    bad arguments raise ``ValueError``. Arguments are those of :class:`HessianOperator`,
    :func:`top_hessian_eigenvalue` (pass the previous ``eigenvector`` as ``v0``) and
    :func:`hutchinson_trace`. With a usable ``v0`` (a warm evaluation) the Ritz gap is
    trusted up to ``WARM_GAP_CAP_PER_TOL * tol`` of ``|theta|``, else up to the cold
    ``DEFAULT_GAP_CAP``. With ``deflate`` the trace is ``tr(T)`` (exact on the Lanczos
    Krylov basis ``Q``) plus Hutchinson on ``(I - QQ^T) H (I - QQ^T)``; this holds whether or
    not Lanczos converged, so a non-converged run still gives a trace (``lambda_max`` NaN).
    ``progress`` (:mod:`.progress`) is told both stages from the start (``lanczos`` 0 of
    ``max_hvp``, ``probes`` 0 of ``n_probes``), then each product, and is asked often inside
    each product; a True answer raises :class:`.progress.EvaluationStopped`, with the model
    restored as on any exit.

    Returns
    -------
    CurvatureResult
        ``n_hvp`` counts Lanczos and Hutchinson products; ``eigenvector`` is the top Ritz
        vector (warm start for the next evaluation, also after a non-converged run) and None
        only after a non-finite product.
    """
    if n_probes < 2:
        raise ValueError(f"n_probes must be >= 2, got {n_probes}")
    report(progress, "lanczos", 0, max_hvp)
    report(progress, "probes", 0, n_probes)
    with preserved_model_state(model, train=True):
        operator = HessianOperator(
            model, inputs, targets, chunk_size=chunk_size, precision=precision, progress=progress
        )
        if not math.isfinite(operator.loss):
            reason = f"non-finite probe loss ({operator.loss})"
            return CurvatureResult(math.nan, math.nan, math.nan, math.nan, 0, None, reason)
        previous = _unit(v0, operator.device)  # None: a cold evaluation
        start = lanczos_start(previous, operator.gradient)
        warm = previous is not None
        gap_cap = max(DEFAULT_GAP_CAP, WARM_GAP_CAP_PER_TOL * tol) if warm else DEFAULT_GAP_CAP
        eig = top_hessian_eigenvalue(
            operator, v0=start, tol=tol, max_hvp=max_hvp, gap_cap=gap_cap, progress=progress
        )
        defl = deflate and eig.basis is not None
        trace = hutchinson_trace(
            operator,
            n_probes=n_probes,
            generator=generator,
            deflation_vectors=eig.basis if defl else None,
            deflation_values=np.diag(eig.tridiagonal).tolist() if defl else None,
            progress=progress,
        )
        del operator
    return CurvatureResult(
        lambda_max=eig.value,
        hutch_trace=trace.mean,
        hutch_trace_sem=trace.sem,
        hutch_trace_ci95=trace.ci95,
        n_hvp=eig.n_hvp + trace.n_hvp,
        eigenvector=eig.vector,
        reason="; ".join(r for r in (eig.reason, trace.reason) if r),
    )


def lanczos_start(
    v0: torch.Tensor | np.ndarray | None, gradient: torch.Tensor
) -> torch.Tensor | None:
    """Start vector of an evaluation: ``v0/|v0| + g/|g|`` (previous eigenvector plus the
    probe batch's gradient), or ``g/|g|`` without a usable ``v0``; None if neither is usable.

    The gradient concentrates on the top Hessian eigenvectors; on ResNet-18 starting from it
    took 21 instead of 30 Lanczos steps at initialisation and 10 instead of 12 warm. The start
    depends on the weights and the probe batch only, never on the Hutchinson probes, so the
    deflated trace stays unbiased.
    """
    g = _unit(gradient, gradient.device)
    v = _unit(v0, g.device if g is not None else torch.device("cpu"))
    if v is not None and g is not None:
        if v.shape != g.shape:
            raise ValueError(f"v0 must have {g.numel()} elements, got {v.numel()}")
        return v + g
    return v if v is not None else g


def _unit(v: torch.Tensor | np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    """``v / |v|`` as a flat float64 vector on ``device``; None if ``v`` is None, zero or not
    finite (not a usable start)."""
    if v is None:
        return None
    v = torch.as_tensor(np.asarray(v) if isinstance(v, np.ndarray) else v)
    v = v.detach().to(device, torch.float64).reshape(-1)
    norm = float(torch.linalg.vector_norm(v))
    return v / norm if math.isfinite(norm) and norm > 0 else None


def _flatten(tensors: Sequence[torch.Tensor | None], params: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-parameter tensors into one flat vector; None counts as zeros."""
    pieces = [torch.zeros_like(p) if t is None else t for t, p in zip(tensors, params, strict=True)]
    return torch.cat([t.reshape(-1) for t in pieces])


def _to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Move to ``device``; floating tensors (e.g. fp16 images) are also cast to ``dtype``."""
    return x.to(device, dtype) if x.is_floating_point() else x.to(device)


def _deflation(
    hvp: HVPOperator,
    vectors: torch.Tensor | Sequence[torch.Tensor] | None,
    values: Sequence[float] | None,
    progress: ProgressFn | None = None,
) -> tuple[list[torch.Tensor] | None, float]:
    """Validate the deflation basis; return its vectors on the operator's device, sum(values)."""
    if vectors is None and values is None:
        return None, 0.0
    if vectors is None or values is None:
        raise ValueError("pass both deflation_vectors and deflation_values, or neither")
    if isinstance(vectors, torch.Tensor | np.ndarray):
        matrix = torch.as_tensor(vectors)
        matrix = matrix[:, None] if matrix.ndim == 1 else matrix
        if matrix.ndim != 2 or matrix.shape[0] != hvp.n_params:
            raise ValueError(
                f"deflation_vectors must have shape ({hvp.n_params}, {len(values)}), "
                f"got {tuple(matrix.shape)}"
            )
        vectors = list(matrix.T)
    basis = [torch.as_tensor(v).to(hvp.device) for v in vectors]
    basis = [v if v.dtype in (torch.float32, torch.float64) else v.double() for v in basis]
    if len(basis) != len(values) or any(v.shape != (hvp.n_params,) for v in basis):
        raise ValueError(
            f"deflation_vectors must be {len(values)} vectors of {hvp.n_params} elements"
        )
    atol = _ORTHONORMAL_ATOL[basis[0].dtype] if basis else 0.0
    for i, u in enumerate(basis):  # Gram matrix, upper triangle, without a stacked copy
        report(progress, STILL_WORKING, 0, 0)  # r^2 / 2 full-length dots: tens of seconds
        for j in range(i, len(basis)):
            if abs(float(dot64(u, basis[j])) - (i == j)) > atol:
                raise ValueError("deflation_vectors must have orthonormal columns")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("deflation_values must be finite")
    return basis, float(sum(values))
