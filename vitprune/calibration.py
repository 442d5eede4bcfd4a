"""Calibration views for passes that need activations (SNP scores, least-squares recovery); the images
themselves are loaded by :func:`vitprune.data.load_calibration_images`.

* :func:`augment_views`: deterministic extra views of the calibration images (horizontal flip,
  corner crops at the eval transform's crop fraction), grouped so that all views of an image
  fall in the same batch.

Memory stays bounded: callers accumulate statistics batch by batch (Gram matrices, score
sums; :mod:`vitprune.passes.snp.lstsq`) and never hold the activations of all images.
"""

from __future__ import annotations


import torch


#: augmentations understood by :func:`augment_views` (joined with "+")
AUGMENTS = ("flip", "crops")
#: side of a corner crop, as a fraction of the image side: the eval transform's crop_pct (0.875)
CROP_FRACTION = 0.875


def parse_augment(augment: str) -> tuple[str, ...]:
    """``"none"`` -> ``()``, ``"flip+crops"`` -> ``("flip", "crops")``; raises ValueError on an
    unknown or repeated name."""
    if augment in ("none", ""):
        return ()
    names = tuple(augment.split("+"))
    bad = [n for n in names if n not in AUGMENTS]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"augment='{augment}': use none or '+'-joined names from {', '.join(AUGMENTS)}, each once")
    return names


def corner_crops(images: torch.Tensor, fraction: float = CROP_FRACTION) -> list[torch.Tensor]:
    """The four corner crops of side ``round(fraction * side)`` of ``[B, 3, S, S]`` images,
    each resized back to ``S x S`` (bicubic, as the eval transform): the eval transform's
    geometry with a smaller crop fraction (``0.875 * fraction`` of the resized image) and the
    crop moved to a corner. Order: top-left, top-right, bottom-left, bottom-right. Resizing
    commutes with the per-channel normalisation (bicubic weights sum to 1), so normalised
    tensors can be cropped directly."""
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    ch, cw = int(round(fraction * h)), int(round(fraction * w))
    out = []
    for top in (0, h - ch):
        for left in (0, w - cw):
            crop = images[..., top:top + ch, left:left + cw]
            out.append(F.interpolate(crop, size=(h, w), mode="bicubic", align_corners=False))
    return out


def augment_views(images: torch.Tensor, augment: str, batch_size: int) -> tuple[torch.Tensor, int]:
    """Extra deterministic views of calibration images for statistics and least-squares recovery.

    Args:
        images: ``[n, 3, S, S]`` (already eval-transformed and normalised).
        augment: ``none``, ``flip`` (the image and its horizontal mirror), ``crops`` (the image and
            its four :func:`corner_crops`) or ``flip+crops`` (every crop view and its mirror: 10).
        batch_size: images per calibration batch.

    Returns:
        ``(views, k)``: ``[n * k, 3, S, S]`` with ``k`` views per image, ordered chunk by chunk:
        the ``k`` views of images ``i .. i + batch_size - 1`` form one block of
        ``k * batch_size`` rows. Calibrating with batches of ``k * batch_size`` rows therefore
        puts all views of an image in the batch of the image itself, so the two-fold
        cross-validation of the refit (folds = alternate batches) never sees an image in both
        folds.
    """
    names = parse_augment(augment)
    k = (5 if "crops" in names else 1) * (2 if "flip" in names else 1)
    if k == 1:
        return images, 1
    out = []
    for s in range(0, images.shape[0], batch_size):
        chunk = images[s:s + batch_size]
        views = [chunk] + (corner_crops(chunk) if "crops" in names else [])
        if "flip" in names:
            views += [v.flip(-1) for v in views]
        out.append(torch.cat(views))
    return torch.cat(out), k


