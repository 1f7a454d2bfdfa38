"""scikit-learn's bundled 8x8 handwritten digits as tensors, with a fixed train / held-out split.

The data set (1,797 images, 10 classes) ships inside scikit-learn, so nothing is downloaded. Pixels are
integers in [0, 16]; they are mapped to [-1, 1] by ``x / 8 - 1``.

The split is fixed: 20 % of the images, stratified by class with ``random_state=0``
(``sklearn.model_selection.train_test_split``), form the held-out test split (360 images); the other
1,437 images are the training split. Every network in ``samples/weights`` was trained on the training
split only.

The held-out split also ships as ``samples/data/digits_heldout.npz`` (raw pixels, 10 kB; tested equal to the
scikit-learn split), so evaluation needs no scikit-learn (:func:`load_heldout`); only training does
(``pip install 'diffusion-guidance[train]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from samples.extras import require

TEST_FRACTION = 0.2
SPLIT_SEED = 0
NUM_CLASSES = 10
IMAGE_SIZE = 8
HELDOUT_FILE = Path(__file__).resolve().parents[1] / "data" / "digits_heldout.npz"


class DigitsSplit(NamedTuple):
    """Images as float32 ``[N, 1, 8, 8]`` in [-1, 1] and labels as int64 ``[N]``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """Map raw digit pixels in [0, 16] (shape ``[N, 64]`` or ``[N, 8, 8]``) to float32 ``[N, 1, 8, 8]`` in [-1, 1]."""
    images = np.asarray(pixels, dtype=np.float32).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return torch.from_numpy(images / 8.0 - 1.0)


def load_digits_split() -> DigitsSplit:
    """Load the digits and return the fixed stratified 80/20 split (``random_state=0``); needs scikit-learn."""
    require("sklearn", "train", "the digits training split (scikit-learn's bundled data set)")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.data, digits.target, test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    return DigitsSplit(
        train_images=to_unit_range(train_x),
        train_labels=torch.as_tensor(train_y, dtype=torch.int64),
        test_images=to_unit_range(test_x),
        test_labels=torch.as_tensor(test_y, dtype=torch.int64),
    )


def load_heldout() -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out split shipped with the package: images float32 ``[360, 1, 8, 8]`` in [-1, 1], labels int64."""
    with np.load(HELDOUT_FILE, allow_pickle=False) as data:
        return to_unit_range(data["pixels"]), torch.as_tensor(data["labels"], dtype=torch.int64)


def write_heldout(path: str | Path = HELDOUT_FILE) -> None:
    """Write the held-out split's raw pixels (uint8, [0, 16]) and labels to ``path`` (needs scikit-learn)."""
    split = load_digits_split()
    pixels = ((split.test_images[:, 0] + 1.0) * 8.0).round().to(torch.uint8).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, pixels=pixels, labels=split.test_labels.numpy())
