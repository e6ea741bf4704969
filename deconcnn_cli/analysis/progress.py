"""Progress of a long evaluation, and how its caller abandons one: a plain callable in, an
exception out.

An analysis function that can take long (a curvature evaluation, gradient noise) takes
``progress``, a :data:`ProgressFn`. It calls it before each unit of work with what is done
(``("lanczos", 12, 40)``) and, from backward hooks, often while one unit runs (``("", 0, 0)``:
still working, nothing counted), so a caller can refresh a progress line and answer a stop
within a fraction of one Hessian-vector product. When the callable returns True the function
raises :class:`EvaluationStopped` at once: the evaluation is abandoned and returns nothing.
The caller owns what "stop" means (a signal, a deadline); nothing here reads signals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["EvaluationStopped", "ProgressFn", "STILL_WORKING", "checked_graph", "report"]

# (stage, done, total) -> True to abandon the evaluation; stage "" (done = total = 0): a call
# from inside a unit of work (a forward or backward pass), nothing counted
ProgressFn = Callable[[str, int, int], bool]
STILL_WORKING = ""


class EvaluationStopped(Exception):
    """The caller's ``progress`` asked to stop: the evaluation was abandoned, no result."""


def report(progress: ProgressFn | None, stage: str, done: int, total: int) -> None:
    """Tell ``progress`` where the evaluation is; raise :class:`EvaluationStopped` if it says
    stop. No-op without a callable."""
    if progress is not None and progress(stage, done, total):
        raise EvaluationStopped(f"stopped at {stage or 'work'} {done}/{total}")


@contextlib.contextmanager
def checked_graph(model: nn.Module, progress: ProgressFn | None) -> Iterator[None]:
    """Forward passes inside the block call ``progress(STILL_WORKING, 0, 0)`` at every module,
    and leave a hook on each module's output that does the same whenever a backward pass
    reaches it, also later ones through the same graph. A backward with ``create_graph`` (the
    gradient a Hessian-vector product differentiates) gets the same hook on each gradient it
    computes there, so each product asks in both of its halves: back through that gradient's
    graph, then through the forward's. The hooks change no value; the module hooks are removed
    on exit, the tensor hooks live as long as the graph. Nothing is installed without a
    callable."""
    if progress is None:
        yield
        return

    def check(*_: object) -> None:
        report(progress, STILL_WORKING, 0, 0)

    def on_grad(grad: torch.Tensor) -> None:
        check()
        if grad.requires_grad:  # a backward with create_graph: its gradients are a graph too
            grad.register_hook(check)

    def on_forward(_module: nn.Module, _inputs: object, output: object) -> None:
        check()
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(on_grad)  # returns None: the gradient is left as it is

    handles = [m.register_forward_hook(on_forward) for m in model.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
