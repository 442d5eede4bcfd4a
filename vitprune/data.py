"""Images: folders of labelled ImageNet-style images, calibration images, and the one transform rule.

Layout (as ``../shared/data/imagenet-sample``): files ``<synset>_<anything>.JPEG`` (any
common image suffix) and a ``synsets.txt`` whose 0-based line number of a synset is its
class index (the standard ImageNet-1k order used by timm and torchvision).

Every image vitprune reads (evaluation, calibration, kept-token maps) goes through
:func:`eval_transform` of the model (for a graph without its model: :func:`default_eval_transform`).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .errors import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")

#: DeiT's official evaluation resizes to int(224 / 0.875) = 256 and center-crops 224
#: (facebookresearch/deit, ``--eval-crop-ratio 0.875``); timm's hub config says 0.9.
EVAL_CROP_PCT = {"deit_": 0.875}


def eval_transform(model, crop_pct: Optional[float] = None) -> Callable:
    """timm's evaluation transform for ``model`` (resize, center crop, normalise): PIL -> [3, H, W].

    Args:
        crop_pct: center-crop ratio; default: the original paper's ratio where known
            (:data:`EVAL_CROP_PCT`, DeiT 0.875), else timm's config for the model.
    """
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    if crop_pct is None:
        crop_pct = next((v for k, v in EVAL_CROP_PCT.items() if arch.startswith(k)), None)
    if crop_pct is not None:
        cfg["crop_pct"] = crop_pct
    return timm.data.create_transform(**cfg)


def default_eval_transform(image_size: int = 224) -> Callable:
    """The same rule when only the input size is known (a graph without its model): bicubic resize to
    ``size / 0.875``, center crop, ImageNet mean/std (timm's defaults for ViT/DeiT)."""
    import timm.data

    return timm.data.create_transform(input_size=(3, image_size, image_size), crop_pct=0.875,
                                      interpolation="bicubic", mean=timm.data.IMAGENET_DEFAULT_MEAN,
                                      std=timm.data.IMAGENET_DEFAULT_STD)


def list_images(folder: str) -> list[str]:
    """Sorted image paths in ``folder`` (non-recursive).

    Raises:
        DataError: the folder does not exist.
    """
    if not os.path.isdir(folder):
        raise DataError(f"image folder '{folder}' does not exist; pass a folder of images")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))


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
        limit: use only the first ``limit`` images (sorted by file name), ``>= 1``.
        exclude: image paths to leave out (held out for calibration), before ``limit``.
        files: use only these image paths (e.g. one side of a calibration / held-out split), before ``limit``.

    Attributes:
        num_classes: the number of classes ``synsets.txt`` lists.
        unlisted: images whose synset ``synsets.txt`` does not list (not evaluated).

    Raises:
        DataError: missing folder, missing ``synsets.txt``, no labelled images, or ``limit < 1``.
    """

    def __init__(self, root: str, transform: Callable, limit: Optional[int] = None, exclude=(),
                 files: Optional[Sequence[str]] = None):
        if not os.path.isdir(root):
            raise DataError(f"data folder {root} does not exist")
        if limit is not None and limit < 1:
            raise DataError(f"limit must be a positive number of images, got {limit}")
        self.root = root
        self.transform = transform
        classes = read_synsets(os.path.join(root, "synsets.txt"))
        self.num_classes = len(classes)
        skip = {os.path.abspath(p) for p in exclude}
        only = None if files is None else {os.path.abspath(p) for p in files}

        def wanted(f: str) -> bool:
            path = os.path.abspath(os.path.join(root, f))
            return path not in skip and (only is None or path in only)

        names = sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_SUFFIXES) and wanted(f))
        self.samples = [(os.path.join(root, f), classes[f.split("_")[0]]) for f in names if f.split("_")[0] in classes]
        self.unlisted = len(names) - len(self.samples)
        if not self.samples:
            raise DataError(f"no labelled images in {root}: expected files named <synset>_<name>.JPEG whose synset "
                            "is listed in synsets.txt")
        if limit is not None:
            self.samples = self.samples[:limit]
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


def load_images(root: str, transform: Callable, limit: Optional[int] = None,
                files: Optional[Sequence[str]] = None) -> torch.Tensor:
    """The first ``limit`` readable images of a folder (only ``files`` when given) as one tensor
    ``[N, 3, H, W]`` (a calibration set, for example)."""
    ds = ImageFolder(root, transform, limit=limit, files=files)
    xs = [x for x, _, _ in make_loader(ds, batch_size=32) if len(x)]
    return torch.cat(xs) if xs else torch.empty(0)


def check_labels(dataset: ImageFolder, num_classes: int) -> None:
    """Refuse labels that cannot be the model's: ``synsets.txt`` must list exactly the model's classes
    (a partial list would relabel classes by line number); warn about images whose synset it lacks.

    Raises:
        DataError: ``synsets.txt`` lists another number of classes than the model predicts.
    """
    if dataset.num_classes != num_classes:
        raise DataError(f"{os.path.join(dataset.root, 'synsets.txt')} lists {dataset.num_classes} classes but the model "
                        f"predicts {num_classes}: labels are line numbers of that file, so it must list all "
                        f"{num_classes} classes in the model's order (ImageNet-1k: the standard synset order)")
    if dataset.unlisted:
        warnings.warn(f"{dataset.unlisted} image(s) in {dataset.root} have a synset not in synsets.txt and are not "
                      f"evaluated", stacklevel=2)


def load_image_files(paths, transform: Callable) -> tuple[torch.Tensor, list[str]]:
    """The readable images among ``paths`` as ``[N, 3, H, W]`` (``transform`` applied), and the paths that
    could not be read (named, not raised)."""
    xs, bad = [], []
    for p in paths:
        try:
            with Image.open(p) as img:
                xs.append(transform(img.convert("RGB")))
        except (OSError, UnidentifiedImageError, SyntaxError):
            bad.append(p)
    return (torch.stack(xs) if xs else torch.empty(0)), bad


def warn_skipped(count: int, root: str) -> None:
    if count:
        warnings.warn(f"skipped {count} unreadable image(s) in {root}", stacklevel=2)


def load_calibration_images(folder: str, n: int, transform: Callable) -> torch.Tensor:
    """The first ``n`` readable images (sorted file names) of ``folder`` as ``[n', 3, H, W]``, no labels needed.

    Raises:
        DataError: the folder is missing or holds no readable image.
    Warns:
        UserWarning: fewer than ``n`` readable images (all are used), naming unreadable files.
    """
    paths, images, bad, start = list_images(folder), [], [], 0
    while len(images) < n and start < len(paths):          # the first n readable ones
        got, skipped = load_image_files(paths[start:start + n - len(images)], transform)
        start += n - len(images)
        images.extend(got)
        bad.extend(skipped)
    images = torch.stack(images) if images else torch.empty(0)
    if not len(images):
        raise DataError(f"calibration folder '{folder}' has no readable image (suffixes {', '.join(IMAGE_SUFFIXES)})")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable calibration image(s) in {folder}: {', '.join(map(os.path.basename, bad[:3]))}"
                      + (" ..." if len(bad) > 3 else ""), stacklevel=2)
    if len(images) < n:
        warnings.warn(f"calibration folder '{folder}' has {len(images)} readable images, fewer than the {n} asked; "
                      f"using all {len(images)}", stacklevel=2)
    return images
