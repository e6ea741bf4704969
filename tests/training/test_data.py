"""Tests for the data layer: real torchvision loading of CIFAR-format files, digits,
batched augmentation and the stateless (seed, step) data order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deconcnn_cli.training import data
from deconcnn_cli.training.data import (
    DataError,
    DataSplits,
    augment_batch,
    epoch_permutation,
    load_splits,
    normalize,
    steps_per_epoch,
    train_batch,
    val_batches,
)
from tests.training.cifar_fixture import (
    fixture_arrays,
    patch_cifar10_checksums,
    write_cifar10_fixture,
)

CPU = torch.device("cpu")
N_PER_BATCH = 20  # 100 training images in the fixture
INTERP_ATOL = 1e-3  # pixel units (0..255): float error of an identity grid_sample


def _load(dataset: str, root=None, *, split_seed: int = 0, image_size: int = 32, **kw):
    kw = {"val_fraction": 0.1, "download": False, "device": CPU, **kw}
    return load_splits(dataset, root, split_seed=split_seed, image_size=image_size, **kw)


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    root = write_cifar10_fixture(tmp_path / "cifar", n_per_batch=N_PER_BATCH, seed=3)
    patch_cifar10_checksums(monkeypatch, root)
    return root


# ----------------------------------------------------------------------------- loading


def test_cifar10_round_trips_pixels_and_labels(cifar_root):
    images, labels = fixture_arrays(N_PER_BATCH, seed=3)
    splits = _load("cifar10", cifar_root)

    assert (splits.n_train, splits.n_val) == (90, 10)
    assert splits.train_x.dtype == torch.uint8 and splits.train_x.shape[1:] == (3, 32, 32)
    assert splits.train_y.dtype == torch.int64
    assert splits.num_classes == 10 and splits.name == "cifar10"
    both = torch.cat([splits.train_indices, splits.val_indices]).sort().values
    assert torch.equal(both, torch.arange(100))
    for source in (0, 37, 99):  # specific images, wherever the split put them
        for x, y, idx in (
            (splits.train_x, splits.train_y, splits.train_indices),
            (splits.val_x, splits.val_y, splits.val_indices),
        ):
            hits = (idx == source).nonzero().flatten()
            if len(hits):
                row = int(hits[0])
                assert np.array_equal(x[row].numpy(), images[source])
                assert int(y[row]) == labels[source]
    expected_mean = images[splits.train_indices.numpy()].mean(axis=(0, 2, 3)) / 255.0
    assert splits.mean.dtype == torch.float32 and splits.mean.shape == (3,)
    np.testing.assert_allclose(splits.mean.numpy(), expected_mean, rtol=1e-5)


def test_split_is_fixed_by_split_seed_not_by_run_seed(cifar_root):
    torch.manual_seed(1)
    first = _load("cifar10", cifar_root, split_seed=7)
    torch.manual_seed(2)  # the global RNG (run seed) must not matter
    again = _load("cifar10", cifar_root, split_seed=7)
    other = _load("cifar10", cifar_root, split_seed=8)
    assert torch.equal(first.val_indices, again.val_indices)
    assert torch.equal(first.val_x, again.val_x)
    assert not torch.equal(first.val_indices, other.val_indices)


def test_missing_cifar_files_raise_data_error_with_hint(tmp_path):
    with pytest.raises(DataError) as info:
        _load("cifar10", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in info.value.message
    assert "--download" in info.value.hint and "--data-dir" in info.value.hint
    with pytest.raises(DataError) as info:
        _load("cifar100", None)
    assert "--data-dir" in info.value.hint


def test_cifar_files_with_wrong_checksums_raise_data_error(tmp_path):
    root = write_cifar10_fixture(tmp_path, n_per_batch=4)  # real md5s expected: mismatch
    with pytest.raises(DataError, match="checksum") as info:
        _load("cifar10", root)
    assert "--download" in info.value.hint


@pytest.mark.parametrize("image_size", [32, 16])
def test_digits_shapes_dtypes_and_classes(image_size):
    splits = _load("digits", image_size=image_size, val_fraction=0.2)
    assert splits.n_train + splits.n_val == 1797
    assert splits.n_val == round(0.2 * 1797)
    assert splits.train_x.shape[1:] == (3, image_size, image_size)
    assert splits.train_x.dtype == torch.uint8 and splits.val_y.dtype == torch.int64
    assert splits.num_classes == 10
    assert set(splits.train_y.tolist()) == set(range(10))
    assert torch.equal(splits.train_x[:, 0], splits.train_x[:, 2])  # grey replicated to RGB
    assert int(splits.train_x.max()) == 255 and int(splits.train_x.min()) == 0
    assert splits.std.dtype == torch.float32 and bool((splits.std > 0).all())


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset"):
        _load("mnist")


# ------------------------------------------------------------------------ augmentation


def _image(seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, size, size), generator=g, dtype=torch.uint8)


def test_augment_draws_a_different_crop_per_image():
    batch = _image().expand(64, -1, -1, -1)
    out = augment_batch(batch, torch.Generator().manual_seed(0), out_size=32)
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    dist = torch.cdist(out.flatten(1), out.flatten(1))
    off_diagonal = dist[~torch.eye(64, dtype=torch.bool)]
    assert float(off_diagonal.min()) > 1.0


def test_augment_is_deterministic_given_the_generator_seed():
    batch = _image().expand(16, -1, -1, -1)
    a = augment_batch(batch, torch.Generator().manual_seed(5), out_size=32)
    b = augment_batch(batch, torch.Generator().manual_seed(5), out_size=32)
    c = augment_batch(batch, torch.Generator().manual_seed(6), out_size=32)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_augment_without_crop_or_flip_is_the_identity():
    batch = torch.cat([_image(s) for s in range(4)])
    out = augment_batch(
        batch, torch.Generator().manual_seed(0), out_size=32, scale=(1, 1), ratio=(1, 1), flip=False
    )
    torch.testing.assert_close(out, batch.float(), atol=INTERP_ATOL, rtol=0)


def test_augment_flips_about_half_the_images():
    n = 1000
    image = _image()
    out = augment_batch(
        image.expand(n, -1, -1, -1),
        torch.Generator().manual_seed(1),
        out_size=32,
        scale=(1, 1),
        ratio=(1, 1),
    )
    same = (out - image.float()).abs().amax(dim=(1, 2, 3)) < INTERP_ATOL
    mirrored = (out - image.flip(-1).float()).abs().amax(dim=(1, 2, 3)) < INTERP_ATOL
    assert bool((same ^ mirrored).all())  # every output is exactly one of the two
    assert 430 <= int(mirrored.sum()) <= 570  # Binomial(1000, 0.5): +-4.4 sigma


def test_augment_crop_size_follows_the_area_fraction():
    ramp = (torch.arange(32) * 8).to(torch.uint8).expand(2, 3, 32, 32)  # value = 8 * column
    out = augment_batch(
        ramp, torch.Generator().manual_seed(0), out_size=32, scale=(0.25, 0.25), ratio=(1, 1)
    )
    # A 16-pixel-wide crop resampled to 32 columns: 0.5 input column, 4 units, per output column.
    slope = (out[..., 1:] - out[..., :-1]).abs()[..., 2:-2]
    torch.testing.assert_close(slope, torch.full_like(slope, 4.0), atol=1e-3, rtol=0)


def test_normalize_treats_uint8_and_float_pixels_alike():
    x = _image()
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.5])
    a, b = normalize(x, mean, std), normalize(x.float(), mean, std)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    expected = (float(x[0, 1, 3, 4]) / 255 - 0.4) / 0.25
    assert float(a[0, 1, 3, 4]) == pytest.approx(expected, rel=1e-6)


# -------------------------------------------------------------------------- data order


def _indexed_splits(n_train: int, n_val: int = 5) -> DataSplits:
    """Images whose first pixel is their row (mod 256) and whose label is their row."""
    x = torch.zeros((n_train + n_val, 3, 8, 8), dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n_train + n_val) % 256
    y = torch.arange(n_train + n_val)
    ones = torch.ones(3)
    idx = torch.arange(n_train + n_val)
    return DataSplits(
        x[:n_train], y[:n_train], x[n_train:], y[n_train:], n_train + n_val,
        ones * 0.0, ones, "indexed", idx[:n_train], idx[n_train:],
    )  # fmt: skip


def _batch(splits, step, *, seed=0, batch_size=32, augment=False):
    spe = steps_per_epoch(splits.n_train, batch_size)
    return train_batch(
        splits, step=step, steps_per_epoch=spe, batch_size=batch_size, seed=seed,
        augment=augment, image_size=8,
    )  # fmt: skip


def test_steps_per_epoch_rounds_up():
    assert steps_per_epoch(100, 32) == 4
    assert steps_per_epoch(96, 32) == 3
    assert steps_per_epoch(1, 128) == 1


def test_train_batch_is_a_pure_function_of_seed_and_step():
    splits = _load("digits", image_size=8)
    x1, y1 = _batch(splits, 13, augment=True)
    data._cached_permutation.cache_clear()  # a resumed process starts with an empty cache
    data._cached_draws.cache_clear()
    x2, y2 = _batch(splits, 13, augment=True)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, y3 = _batch(splits, 14, augment=True)
    assert not torch.equal(y1, y3)
    x4, _ = _batch(splits, 13, seed=1, augment=True)
    assert not torch.allclose(x1, x4)


def test_augmentation_is_drawn_afresh_at_every_step():
    splits = _indexed_splits(64)
    same = _image(size=8).expand(64, -1, -1, -1).clone()
    splits = DataSplits(**{**splits.__dict__, "train_x": same})  # order cannot matter now
    x0, _ = _batch(splits, 0, augment=True)
    x1, _ = _batch(splits, 1, augment=True)
    assert not torch.allclose(x0, x1)


def test_each_epoch_covers_every_training_image_once_and_ends_with_the_remainder():
    splits = _indexed_splits(100)
    orders = []
    for epoch in range(2):
        batches = [_batch(splits, epoch * 4 + k) for k in range(4)]
        assert [len(y) for _, y in batches] == [32, 32, 32, 4]
        rows = torch.cat([y for _, y in batches])
        assert torch.equal(rows.sort().values, torch.arange(100))
        for x, y in batches:  # the image travels with its label
            assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), y)
        orders.append(rows)
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(orders[1], epoch_permutation(100, seed=0, epoch=1, device=CPU))


def test_train_batch_rejects_an_inconsistent_steps_per_epoch():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        train_batch(
            _indexed_splits(100), step=0, steps_per_epoch=3, batch_size=32, seed=0,
            augment=False, image_size=8,
        )  # fmt: skip


def test_val_batches_are_fixed_normalised_and_complete():
    splits = _indexed_splits(10, n_val=7)
    batches = list(val_batches(splits, 3))
    assert [len(y) for _, y in batches] == [3, 3, 1]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10, 17))
    first_pixels = torch.cat([x[:, 0, 0, 0] for x, _ in batches])
    torch.testing.assert_close(first_pixels, torch.arange(10, 17) / 255.0)
    assert torch.equal(batches[0][0], next(val_batches(splits, 3))[0])
