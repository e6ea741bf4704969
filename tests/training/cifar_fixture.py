"""Tiny CIFAR-10 files in the real python format, for tests that exercise torchvision's loader.

Usage (in-process tests only)::

    from tests.training.cifar_fixture import patch_cifar10_checksums, write_cifar10_fixture

    root = write_cifar10_fixture(tmp_path, n_per_batch=20)
    patch_cifar10_checksums(monkeypatch, root)
    splits = load_splits("cifar10", root, ..., download=False, ...)

torchvision verifies each file against the md5 of the real CIFAR-10 release, which generated
files cannot match. :func:`patch_cifar10_checksums` replaces the expected md5s on the
``CIFAR10`` class (through ``monkeypatch``, so it is undone after the test) with those of the
generated files; the loader itself runs unmodified. Library code never skips the check, so a
subprocess (``python -m deconcnn_cli ...``) cannot read these files: use ``--dataset digits``
there.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer"]
LABEL_NAMES += ["dog", "frog", "horse", "ship", "truck"]


def fixture_arrays(n_per_batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The training images (uint8, ``5 * n_per_batch x 3 x 32 x 32``) and labels (int64)
    that :func:`write_cifar10_fixture` writes, in file order."""
    rng = np.random.default_rng(seed)
    n = 5 * n_per_batch
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    return images, labels


def write_cifar10_fixture(root: Path, *, n_per_batch: int, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/`` (5 train batches, a test batch, batches.meta).

    Each batch is a pickled dict like the real release as Python 3 reads it with
    ``encoding="latin1"``: ``"data"`` uint8 ``N x 3072`` (R, G, B planes, rows of 32),
    ``"labels"`` a list of ints. Returns ``root``, the directory to pass as ``data_dir``.
    """
    folder = Path(root) / BASE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = fixture_arrays(n_per_batch, seed)
    for i, name in enumerate(TRAIN_FILES):
        part = slice(i * n_per_batch, (i + 1) * n_per_batch)
        _dump(folder / name, images[part], labels[part], name)
    test_images, test_labels = fixture_arrays(n_per_batch // 5 + 1, seed + 1)
    _dump(folder / TEST_FILE, test_images, test_labels, TEST_FILE)
    meta = {"label_names": LABEL_NAMES, "num_cases_per_batch": n_per_batch, "num_vis": 3072}
    with open(folder / META_FILE, "wb") as f:
        pickle.dump(meta, f)
    return Path(root)


def patch_cifar10_checksums(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make torchvision's ``CIFAR10`` expect the md5s of the files under ``root``."""
    from torchvision import datasets

    folder = Path(root) / BASE_FOLDER
    cls = datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f in TRAIN_FILES])
    monkeypatch.setattr(cls, "test_list", [[TEST_FILE, _md5(folder / TEST_FILE)]])
    meta = {**cls.meta, "md5": _md5(folder / META_FILE)}
    monkeypatch.setattr(cls, "meta", meta)


def _dump(path: Path, images: np.ndarray, labels: np.ndarray, name: str) -> None:
    entry = {
        "batch_label": name,
        "labels": [int(v) for v in labels],
        "data": images.reshape(len(images), 3 * 32 * 32),
        "filenames": [f"{name}_{i}.png" for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
