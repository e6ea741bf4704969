"""Shared builders for tests: one writer per kind of file, so that a field changes in one place.

Run directories and sweep roots written without training live in ``tests/export/synthetic.py``
(exported sweeps) and ``tests/sweep/synthetic.py`` (sweeps at scale); grid files for real tiny
sweeps come from :func:`tiny_grid`.
"""

from __future__ import annotations

from collections.abc import Sequence


def tiny_grid(
    name: str,
    *,
    lr: Sequence[float] = (0.1,),
    weight_decay: Sequence[float] = (1e-3,),
    seed: Sequence[int] = (0, 1),
    epochs: int | None = None,
    image_size: int | None = 8,
    curvature_every_steps: int | None = None,
    description: str | None = None,
) -> str:
    """The TOML of a grid of ``base`` runs on the smoke profile (digits, width 1/8), at
    ``image_size`` pixels (None: the profile's), with the given axes and overrides."""
    lines = [f'name = "{name}"']
    if description is not None:
        lines.append(f'description = "{description}"')
    lines += ['variants = ["base"]', 'profiles = ["smoke"]']
    if epochs is not None:
        lines += ["[overrides.schedule]", f"epochs = {epochs}"]
    if image_size is not None:
        lines += ["[overrides.data]", f"image_size = {image_size}"]
    if curvature_every_steps is not None:
        lines += ["[overrides.cadence]", f"curvature_every_steps = {curvature_every_steps}"]

    def values(xs: Sequence[float]) -> str:
        return "[" + ", ".join(repr(x) for x in xs) + "]"

    lines += ["[axes]", f"lr = {values(lr)}", f"weight_decay = {values(weight_decay)}"]
    lines.append(f"seed = {values(seed)}")
    return "\n".join(lines) + "\n"
