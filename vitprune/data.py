"""Loading a folder of labelled ImageNet-style images.

Layout (as ``../shared/data/imagenet-sample``): files ``<synset>_<anything>.JPEG`` (any
common image suffix) and a ``synsets.txt`` whose 0-based line number of a synset is its
class index (the standard ImageNet-1k order used by timm and torchvision).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .errors import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def read_synsets(path: str) -> dict[str, int]:
    """Map synset id -> class index from a ``synsets.txt`` (one ``<synset> [name]`` a line).

    Raises:
        DataError: the file is missing or empty.
    """
    if not os.path.isfile(path):
        raise DataError(f"no synsets.txt at {path}: the data folder needs a synsets.txt listing the class order "
                        "(one synset id per line, e.g. 'n01440764 tench')")
    with open(path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise DataError(f"{path} is empty: it must list one synset id per line in class order")
    return {s: i for i, s in enumerate(ids)}


class ImageFolder(Dataset):
    """Labelled images of one folder: item ``i`` is ``(image [3, H, W] float, label int)``.

    Unreadable images are skipped at load time, counted in ``self.skipped`` and reported in
    one warning.

    Args:
        root: folder with ``<synset>_*.JPEG`` files and ``synsets.txt``.
        transform: PIL image -> tensor (e.g. timm's eval transform for the model).
        limit: use only the first ``limit`` images (sorted by file name) after ``offset``.
        offset: skip the first ``offset`` images (e.g. the calibration images of the same folder).

    Raises:
        DataError: missing folder, missing ``synsets.txt``, or no labelled images.
    """

    def __init__(self, root: str, transform: Callable, limit: Optional[int] = None, offset: int = 0):
        if not os.path.isdir(root):
            raise DataError(f"data folder {root} does not exist")
        self.root = root
        self.transform = transform
        classes = read_synsets(os.path.join(root, "synsets.txt"))
        files = sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_SUFFIXES))
        self.samples = [(os.path.join(root, f), classes[f.split("_")[0]]) for f in files if f.split("_")[0] in classes]
        if not self.samples:
            raise DataError(f"no labelled images in {root}: expected files named <synset>_<name>.JPEG whose synset "
                            "is listed in synsets.txt")
        self.samples = self.samples[offset:offset + limit if limit is not None else None]
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (OSError, UnidentifiedImageError):
            return None
        return self.transform(image), label


def _collate(batch):
    ok = [b for b in batch if b is not None]
    bad = len(batch) - len(ok)
    if not ok:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    xs, ys = zip(*ok)
    return torch.stack(xs), torch.tensor(ys), bad


def make_loader(dataset: ImageFolder, batch_size: int = 50, workers: int = 0) -> DataLoader:
    """Batches ``(images [B, 3, H, W], labels [B], n_unreadable)`` in file order."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate)


def load_images(root: str, transform: Callable, limit: Optional[int] = None) -> torch.Tensor:
    """The first ``limit`` readable images of a folder as one tensor ``[N, 3, H, W]``
    (a calibration set, for example)."""
    ds = ImageFolder(root, transform, limit=limit)
    xs = [x for x, _, _ in make_loader(ds, batch_size=32) if len(x)]
    return torch.cat(xs) if xs else torch.empty(0)


def warn_skipped(count: int, root: str) -> None:
    if count:
        warnings.warn(f"skipped {count} unreadable image(s) in {root}", stacklevel=2)
