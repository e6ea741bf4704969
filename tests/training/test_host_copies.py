"""No blocking host-to-device copy per training step, and the same numbers as drawn one step
at a time: the crops of a whole epoch are drawn and copied at once, the Hutchinson probes are
drawn as int8 and copied once each, their arithmetic done on the device."""

from __future__ import annotations

import collections

import torch

from deconcnn_cli.analysis import hessian
from deconcnn_cli.config import load_run_config
from deconcnn_cli.training import attempt, data, loop
from deconcnn_cli.training.data import (
    augment_batch,
    derive_seed,
    load_splits,
    normalize,
    steps_per_epoch,
    train_batch,
)
from deconcnn_cli.training.rundir import prepare_run_dir
from tests.training.device_copies import DeviceCopies

CPU = torch.device("cpu")
BATCH = 128


def _splits():
    return load_splits(
        "digits", None, val_fraction=0.1, split_seed=0, image_size=8, download=False, device=CPU
    )


def _batch(splits, step: int):
    spe = steps_per_epoch(splits.n_train, BATCH)
    return train_batch(
        splits, step=step, steps_per_epoch=spe, batch_size=BATCH, seed=3, augment=True,
        image_size=8,
    )  # fmt: skip


def test_batches_are_the_ones_drawn_one_step_at_a_time():
    """Every step of two epochs (short last batches included), started mid-epoch with empty
    caches as a resumed process is: byte for byte the crops of a per-step generator."""
    splits = _splits()
    spe = steps_per_epoch(splits.n_train, BATCH)
    data._cached_draws.cache_clear()
    data._cached_permutation.cache_clear()
    for step in [*range(spe // 2, 2 * spe), 0]:
        x, y = _batch(splits, step)
        epoch, position = divmod(step, spe)
        order = data.epoch_permutation(splits.n_train, seed=3, epoch=epoch, device=CPU)
        rows = order[position * BATCH : (position + 1) * BATCH]
        generator = torch.Generator().manual_seed(derive_seed(3, "augment", step))
        crops = augment_batch(splits.train_x[rows], generator, out_size=8)
        assert torch.equal(y, splits.train_y[rows])
        assert torch.equal(x, normalize(crops, splits.mean, splits.std)), step


def test_no_blocking_copy_per_step_in_a_training_run(tmp_path, monkeypatch):
    """The real loop, in process: the blocking copies it asks for do not grow with the steps
    (an epoch's order and crops, the probe batch, validation: none per step)."""
    cfg = load_run_config(
        variant="base",
        profiles=["smoke"],
        overrides=[
            "data.image_size=8",
            "schedule.epochs=3",
            "cadence.curvature_every_steps=0",
            "cadence.noise_every_epochs=0",
            "cadence.shape_every_epochs=0",
        ],
        flags={"seed": 0},
    )
    run_dir = tmp_path / "run"
    prepare_run_dir(cfg, run_dir)
    data._cached_draws.cache_clear()
    data._cached_permutation.cache_clear()
    real_batch = attempt.train_batch
    with DeviceCopies() as copies:

        def batch(splits, *, step, **kw):
            copies.tag = step
            return real_batch(splits, step=step, **kw)

        monkeypatch.setattr(attempt, "train_batch", batch)
        result = loop.train_run(cfg, run_dir, threads=1)
    assert result.state == "completed" and result.steps_done > 20
    assert copies.tag == result.steps_done - 1  # every step went through the counter
    per_step = collections.Counter(t for t in copies.tags if t is not None)
    epochs = cfg.schedule.epochs
    assert sum(per_step.values()) <= 2 * epochs, per_step  # order + crops, once an epoch


def test_probes_are_int8_copied_once_with_the_same_values_and_generator_state():
    n, n_probes = 1000, 3
    seen = []
    real_randint = torch.randint

    def recording(*args, **kwargs):
        seen.append(kwargs.get("dtype", torch.int64))
        return real_randint(*args, **kwargs)

    class Identity:
        n_params, device, dtype = n, CPU, torch.float64
        products: list[torch.Tensor] = []

        def __call__(self, v):
            self.products.append(v.clone())
            return v

    hvp = Identity()
    generator = torch.Generator().manual_seed(7)
    torch.randint = recording
    try:
        with DeviceCopies() as copies:
            result = hessian.hutchinson_trace(hvp, n_probes=n_probes, generator=generator)
    finally:
        torch.randint = real_randint
    assert seen == [torch.int8] * n_probes
    assert copies.blocking + copies.async_ <= n_probes  # one copy each, no more
    assert result.mean == n  # z . z = n for a +-1 probe
    reference = torch.Generator().manual_seed(7)
    for z in hvp.products:
        expected = (2 * torch.randint(0, 2, (n,), generator=reference) - 1).double()
        assert torch.equal(z, expected)
    assert torch.equal(generator.get_state(), reference.get_state())
