"""Batched device-resident augmentation vs torchvision's per-image DataLoader pipeline.

Both sides produce normalised float32 batches of 128 with RandomResizedCrop(32, default
scale/ratio) + horizontal flip, from the same 2048 uint8 CIFAR-sized images. Repetitions are
interleaved (A, B, C, A, B, C, ...) so machine load hits every variant alike; the table
reports the median time of one pass over the images and its ratio to single-threaded
``augment_batch`` (a ratio of 6x means the variant is 6 times slower). On a small, shared
machine the multi-threaded rows suffer most from other processes taking a core.

    python bench/bench_augment.py [--images 2048] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from deconcnn_cli.training.data import augment_batch, normalize

BATCH = 128
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


class _PilImages(Dataset):
    """Like torchvision's CIFAR10: HWC uint8 array, a PIL image per item, then transforms."""

    def __init__(self, images_hwc: np.ndarray, transform: Callable) -> None:
        self.images, self.transform = images_hwc, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), 0


def _batched_pass(images: torch.Tensor, threads: int) -> Callable[[], None]:
    mean, std = torch.tensor(MEAN), torch.tensor(STD)

    def run() -> None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        generator = torch.Generator().manual_seed(0)
        for start in range(0, len(images), BATCH):
            out = augment_batch(images[start : start + BATCH], generator, out_size=32)
            normalize(out, mean, std)
        torch.set_num_threads(previous)

    return run


def _loader_pass(images_hwc: np.ndarray, workers: int) -> Callable[[], None]:
    transform = v2.Compose(
        [
            v2.RandomResizedCrop(32),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    loader = DataLoader(
        _PilImages(images_hwc, transform),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )

    def run() -> None:
        for _ in loader:
            pass

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images_hwc = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    images = torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous()
    cores = torch.get_num_threads()
    variants = {
        "augment_batch (1 thread)": _batched_pass(images, 1),
        f"augment_batch ({cores} threads)": _batched_pass(images, cores),
        "DataLoader + v2, workers=0": _loader_pass(images_hwc, 0),
        "DataLoader + v2, workers=2": _loader_pass(images_hwc, 2),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up: worker start-up, allocator, caches
        run()
    for _ in range(args.reps):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    reference = statistics.median(times["augment_batch (1 thread)"])
    print(f"{args.images} images 3x32x32, batch {BATCH}, {args.reps} interleaved reps, CPU")
    header = f"{'variant':32} {'median s/pass':>14} {'images/s':>10}"
    print(f"{header} {'time / augment_batch(1 thread)':>31}")
    for name, samples in times.items():
        median = statistics.median(samples)
        ratio = median / reference
        print(f"{name:32} {median:14.4f} {args.images / median:10.0f} {ratio:30.1f}x")


if __name__ == "__main__":
    main()
