"""Every random draw of a run is made by a CPU generator, then moved to the run's device: the
batch order, the crops, the noise batches and the Hutchinson probes. A CUDA generator's
stream is not promised to be the same on another GPU model (its kernels' launch shape can
follow the card's multiprocessor count), so a requeue onto another card would change them."""

from __future__ import annotations

import pytest
import torch

from deconcnn_cli.config import load_run_config
from deconcnn_cli.training import measure
from deconcnn_cli.training.data import load_splits, steps_per_epoch, train_batch

REAL_GENERATOR = torch.Generator


@pytest.fixture
def generators(monkeypatch):
    """Record the device every ``torch.Generator`` is asked for (the real one is returned)."""
    asked: list[str] = []

    def recording(*args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        asked.append("the CPU's" if device is None else f"the data's ({device})")
        return REAL_GENERATOR(*args, **kwargs)

    monkeypatch.setattr(torch, "Generator", recording)
    return asked


def test_every_draw_comes_from_a_cpu_generator(generators, monkeypatch):
    """No draw asks for a generator on the data's device (on a GPU that is a CUDA one), even
    where the data are on the CPU, as here: each asks for the CPU's, then moves its draw."""
    cfg = load_run_config(
        variant="base", profiles=["smoke"], overrides=["data.image_size=8"], flags={}
    )
    d = cfg.data
    splits = load_splits(
        "digits", None, val_fraction=d.val_fraction, split_seed=d.split_seed, image_size=8,
        download=False, device=torch.device("cpu"),
    )  # fmt: skip
    spe = steps_per_epoch(splits.n_train, d.batch_size)
    train_batch(
        splits, step=spe + 1, steps_per_epoch=spe, batch_size=d.batch_size, seed=0, augment=True,
        image_size=8,
    )  # fmt: skip
    measure.noise_batches(splits, cfg, step=5)
    seen = []
    monkeypatch.setattr(
        measure.hessian, "evaluate_curvature", lambda *a, generator, **k: seen.append(generator)
    )
    with pytest.raises(AttributeError):  # the stub returns nothing to read: only the draw
        measure.curvature_row(None, (splits.train_x[:4], splits.train_y[:4]), cfg, 0, {})
    assert seen[0].device.type == "cpu"
    # epoch order, crops, 4 noise batches, Hutchinson: every one the CPU's
    assert len(generators) >= 7
    assert set(generators) == {"the CPU's"}, generators
