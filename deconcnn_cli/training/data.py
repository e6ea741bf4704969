"""The data layer: device-resident splits, batched augmentation, a stateless data order.

The whole training set lives on the device as one uint8 tensor (airbench style). Shuffling
and augmentation are batched tensor ops, and every random draw comes from a generator seeded
by ``(seed, epoch)`` or ``(seed, step)``. So the batch at optimizer step ``t`` is a pure
function of ``(seed, t)``: a resumed run gets exactly the same batches with no saved
data-loader state.

Pixel convention: images are stored as uint8 in ``[0, 255]``; :func:`augment_batch` returns
float32 still in pixel units ``[0, 255]``; :func:`normalize` maps pixel units (uint8 or
float) to ``(x / 255 - mean) / std`` with ``mean``/``std`` in ``[0, 1]`` units.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from deconcnn_cli.errors import DeconError

DATASETS = ("cifar10", "cifar100", "digits")


class DataError(DeconError):
    """A dataset that cannot be loaded: a message and a hint saying what to do next."""


@dataclass(frozen=True)
class DataSplits:
    """Train/validation splits resident on one device.

    ``train_x``/``val_x`` are uint8 ``N x C x H x W``; ``train_y``/``val_y`` int64;
    ``mean``/``std`` per-channel float32 in ``[0, 1]`` units, from the train split only.
    ``train_indices``/``val_indices`` (CPU int64) are the rows of the source training set
    that each split holds, in ascending order.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int
    mean: Tensor
    std: Tensor
    name: str
    train_indices: Tensor
    val_indices: Tensor

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.val_x.shape[0])


# ----------------------------------------------------------------------------- loading


def load_splits(
    dataset: str,
    data_dir: Path | None,
    *,
    val_fraction: float,
    split_seed: int,
    image_size: int,
    download: bool,
    device: torch.device,
) -> DataSplits:
    """Load a dataset's training set and split it into train/validation on ``device``.

    The split is a permutation from ``torch.Generator().manual_seed(split_seed)`` (CPU);
    the first ``round(val_fraction * N)`` permuted rows are held out for validation. It
    does not depend on the run seed. The test set is never read.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if dataset == "digits":
        x, y, num_classes = _load_digits()
    elif dataset in ("cifar10", "cifar100"):
        x, y, num_classes = _load_cifar(dataset, data_dir, download=download)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = _resize_uint8(x, image_size)

    n = x.shape[0]
    n_val = round(val_fraction * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    train_x = x[train_idx]
    pixels = train_x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).double() / 255.0
    return DataSplits(
        train_x=train_x.to(device),
        train_y=y[train_idx].to(device),
        val_x=x[val_idx].to(device),
        val_y=y[val_idx].to(device),
        num_classes=num_classes,
        mean=pixels.mean(dim=1).float().to(device),
        std=pixels.std(dim=1).float().to(device),
        name=dataset,
        train_indices=train_idx,
        val_indices=val_idx,
    )


def _load_digits() -> tuple[Tensor, Tensor, int]:
    """scikit-learn's bundled 8x8 digits (values 0..16) as uint8 0..255, 3 channels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).double()  # N x 8 x 8, in 0..16
    x = (images * (255.0 / 16.0)).round().to(torch.uint8)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(bunch.target).long(), 10


def check_available(dataset: str, data_dir: Path | None, *, download: bool) -> Path:
    """Raise :class:`DataError` now if ``load_splits`` could not find the dataset's files.

    Cheap (file existence only), so a command can fail before it writes anything. Returns
    the torchvision root folder (an empty path for the bundled digits).
    """
    if dataset not in ("cifar10", "cifar100"):
        return Path()
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    if data_dir is None:
        raise DataError(f"{dataset} needs a data directory", "pass --data-dir DIR (add --download)")
    root = Path(data_dir).expanduser()
    folder = root / cls.base_folder
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in names if not (folder / f).is_file()]
    if missing and not download:
        raise DataError(
            f"{dataset} not found in {folder} (missing: {', '.join(missing)})",
            f"pass --download to fetch it into {root}, or --data-dir pointing at the folder "
            f"that contains {cls.base_folder}/",
        )
    return root


def _load_cifar(
    dataset: str, data_dir: Path | None, *, download: bool
) -> tuple[Tensor, Tensor, int]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    root = check_available(dataset, data_dir, download=download)
    folder = root / cls.base_folder
    try:
        ds = cls(root=str(root), train=True, download=download)
    except RuntimeError as exc:  # torchvision's md5 check failed
        raise DataError(
            f"{dataset} files in {folder} are corrupted (checksum mismatch): {exc}",
            f"delete {folder} and rerun with --download",
        ) from exc
    except OSError as exc:  # includes urllib's URLError when offline
        raise DataError(
            f"could not download {dataset} into {root}: {exc}",
            "download it on a machine with internet access and pass --data-dir",
        ) from exc
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    return x, torch.tensor(ds.targets, dtype=torch.long), len(ds.classes)


def _resize_uint8(x: Tensor, size: int) -> Tensor:
    """Bilinear resize (align_corners=False, antialiased when shrinking) of uint8 images."""
    shrink = size < max(x.shape[-2:])
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=shrink)
    return out.round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------ augmentation


def augment_batch(
    x_uint8: Tensor,
    generator: torch.Generator,
    *,
    out_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> Tensor:
    """RandomResizedCrop + horizontal flip, drawn independently per image, in one batched op.

    Per image: area fraction ``s ~ U(scale)``, ``log r ~ U(log ratio)``; crop width
    ``w = sqrt(s * H * W * r)``, height ``h = sqrt(s * H * W / r)`` (continuous, in pixels),
    each clamped to the image; centre uniform over the positions that keep the crop inside;
    mirrored with probability 0.5 when ``flip``. The crops are resampled to ``out_size``
    by one ``F.affine_grid`` + ``F.grid_sample`` (bilinear, align_corners=False).

    Differences from torchvision's ``RandomResizedCrop``: torchvision retries a draw up to
    10 times until the crop fits, then falls back to a centre crop; here an oversize side is
    clamped instead (so such crops are a little squarer/smaller than drawn). Crop sizes and
    offsets are continuous, not rounded to whole pixels, and shrinking is not antialiased
    (irrelevant for CIFAR, where a crop is never larger than the 32-pixel output).

    Returns float32 in pixel units ``[0, 255]``; normalise with :func:`normalize`. All
    draws come from ``generator`` (on any device), so the output is a deterministic
    function of the generator's seed and the input.
    """
    if x_uint8.ndim != 4:
        raise ValueError(f"expected N x C x H x W images, got shape {tuple(x_uint8.shape)}")
    draws = augment_draws(x_uint8.shape[0], generator).to(x_uint8.device)
    return augment_with(x_uint8, draws, out_size=out_size, scale=scale, ratio=ratio, flip=flip)


def augment_draws(n: int, generator: torch.Generator) -> Tensor:
    """The ``n x 5`` uniform draws :func:`augment_batch` takes for ``n`` images, on the
    generator's device: area, log aspect, centre x, centre y, mirror."""
    return torch.rand((n, 5), generator=generator, device=generator.device)


def augment_with(
    x_uint8: Tensor,
    draws: Tensor,
    *,
    out_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> Tensor:
    """:func:`augment_batch` with its draws given (``n x 5``, on the images' device)."""
    if x_uint8.ndim != 4:
        raise ValueError(f"expected N x C x H x W images, got shape {tuple(x_uint8.shape)}")
    n, _, height, width = x_uint8.shape
    if tuple(draws.shape) != (n, 5):
        raise ValueError(f"expected {n} x 5 draws, got shape {tuple(draws.shape)}")
    u = draws
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * (height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    crop_w = torch.sqrt(area * aspect).clamp(max=width)
    crop_h = torch.sqrt(area / aspect).clamp(max=height)
    centre_x = crop_w / 2 + (width - crop_w) * u[:, 2]
    centre_y = crop_h / 2 + (height - crop_h) * u[:, 3]
    mirror = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones_like(u[:, 4])

    # Map output coords in [-1, 1] to input coords in [-1, 1] (pixel edges, align_corners=False).
    theta = torch.zeros((n, 2, 3), dtype=torch.float32, device=x_uint8.device)
    theta[:, 0, 0] = crop_w / width * mirror
    theta[:, 0, 2] = 2 * centre_x / width - 1
    theta[:, 1, 1] = crop_h / height
    theta[:, 1, 2] = 2 * centre_y / height - 1
    grid = F.affine_grid(theta, [n, x_uint8.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(
        x_uint8.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x / 255 - mean) / std`` per channel, for images in pixel units (uint8 or float)."""
    x = x.float() / 255.0
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# -------------------------------------------------------------------------- data order


def derive_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit generator seed for ``(seed, stream, index)``.

    The first 8 bytes of BLAKE2b(``"decon/{stream}/{seed}/{index}"``), top bit cleared.
    Distinct streams (``"epoch"`` for shuffles, ``"augment"`` for crops) and indices give
    unrelated seeds, with no limit on the number of epochs or steps.
    """
    digest = hashlib.blake2b(f"decon/{stream}/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps per epoch: ``ceil(n_train / batch_size)`` (the last batch is short)."""
    if n_train < 1 or batch_size < 1:
        raise ValueError(f"need n_train >= 1 and batch_size >= 1, got {n_train}, {batch_size}")
    return -(-n_train // batch_size)


def epoch_permutation(n: int, *, seed: int, epoch: int, device: torch.device) -> Tensor:
    """The order of the ``n`` training images in ``epoch``: a randperm from a CPU generator
    seeded with ``derive_seed(seed, "epoch", epoch)``, moved to ``device``. Every draw of a
    run is made on the CPU, so the same run gets the same batches on any card (a CUDA
    generator's stream is not promised to match across GPU models)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return to_device(torch.randperm(n, generator=generator), device)


def epoch_augment_draws(
    n: int, *, batch_size: int, seed: int, epoch: int, device: torch.device
) -> Tensor:
    """The crop draws of every step of ``epoch``, ``n x 5``, moved to ``device`` in one copy.

    Rows ``position * batch_size`` onwards are step ``epoch * spe + position``'s: the draws
    :func:`augment_draws` makes from a CPU generator seeded with
    ``derive_seed(seed, "augment", step)``, the same numbers as one step at a time. Drawn per
    epoch, so a step reads its draws from the device without a copy (a blocking copy per
    step would keep the host from running ahead of the GPU).
    """
    spe = steps_per_epoch(n, batch_size)
    parts = []
    for position in range(spe):
        step = epoch * spe + position
        generator = torch.Generator().manual_seed(derive_seed(seed, "augment", step))
        rows = min(batch_size, n - position * batch_size)
        parts.append(augment_draws(rows, generator))
    return to_device(torch.cat(parts), device)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (on the CPU) on ``device``; to a GPU through pinned memory without waiting for
    the copy (``non_blocking``: the host goes on; the pinned block is kept until the copy is
    done by torch's host allocator, and the copy is ordered before any kernel that reads it)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@lru_cache(maxsize=4)
def _cached_permutation(n: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    return epoch_permutation(n, seed=seed, epoch=epoch, device=device)


@lru_cache(maxsize=4)
def _cached_draws(n: int, batch_size: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    return epoch_augment_draws(n, batch_size=batch_size, seed=seed, epoch=epoch, device=device)


def train_batch(
    splits: DataSplits,
    *,
    step: int,
    steps_per_epoch: int,
    batch_size: int,
    seed: int,
    augment: bool,
    image_size: int,
) -> tuple[Tensor, Tensor]:
    """The normalised float32 batch and its labels for global optimizer step ``step``.

    Epoch ``step // steps_per_epoch`` visits every training image once, in the order of
    :func:`epoch_permutation`; the last batch of an epoch holds the remainder. Crops come
    from a generator seeded with ``derive_seed(seed, "augment", step)``, drawn for the whole
    epoch at once (:func:`epoch_augment_draws`): no copy to the device per step. A pure
    function of ``(splits, seed, step)``: resuming needs no saved data-loader state.
    """
    n = splits.n_train
    expected = -(-n // batch_size) if batch_size >= 1 else 0
    if steps_per_epoch != expected:
        raise ValueError(
            f"steps_per_epoch={steps_per_epoch} but ceil({n} / {batch_size}) = {expected}"
        )
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, position = divmod(step, steps_per_epoch)
    device = splits.train_x.device
    order = _cached_permutation(n, seed, epoch, device)
    rows_slice = slice(position * batch_size, (position + 1) * batch_size)
    rows = order[rows_slice]
    x, y = splits.train_x[rows], splits.train_y[rows]
    if augment:
        draws = _cached_draws(n, batch_size, seed, epoch, device)[rows_slice]
        images = augment_with(x, draws, out_size=image_size)
    elif x.shape[-1] != image_size or x.shape[-2] != image_size:
        images = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear")
    else:
        images = x
    return normalize(images, splits.mean, splits.std), y


def val_batches(splits: DataSplits, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The validation split in fixed order, normalised, without augmentation."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, splits.n_val, batch_size):
        stop = start + batch_size
        yield normalize(splits.val_x[start:stop], splits.mean, splits.std), splits.val_y[start:stop]
