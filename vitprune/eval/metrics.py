"""Accuracy: top-1 against labels and top-1 agreement with a reference (unpruned) model."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..data import warn_skipped
from ..errors import DataError


@torch.no_grad()
def evaluate(fn: Callable[[torch.Tensor], torch.Tensor], loader, reference: Optional[Callable] = None,
             progress: bool = True, desc: str = "eval") -> dict:
    """Run ``fn`` over a loader of ``(images [B, 3, H, W], labels [B], n_unreadable)`` batches.

    Args:
        fn: images -> logits ``[B, classes]``.
        loader: from :func:`vitprune.data.make_loader`.
        reference: optional images -> logits of the unpruned model; its top-1 predictions are
            compared with ``fn``'s.

    Raises:
        DataError: no batch held a readable image.

    Returns:
        ``{"top1": %, "correct": int, "images": int, "skipped": int}`` plus, with a reference,
        ``"top1_agreement": %`` and ``"top1_reference": %``.
    """
    correct = agree = ref_correct = n = skipped = 0
    for x, y, bad in tqdm(loader, desc=desc, disable=not progress, leave=False):
        skipped += bad
        if not len(x):
            continue
        pred = fn(x).argmax(-1)
        correct += int((pred == y).sum())
        n += len(y)
        if reference is not None:
            ref = reference(x).argmax(-1)
            agree += int((pred == ref).sum())
            ref_correct += int((ref == y).sum())
    root = getattr(loader.dataset, "root", "the data folder")
    warn_skipped(skipped, root)
    if n == 0:
        raise DataError(f"no readable image to evaluate in {root} ({skipped} unreadable)")
    out = {"top1": 100.0 * correct / max(n, 1), "correct": correct, "images": n, "skipped": skipped}
    if reference is not None:
        out["top1_agreement"] = 100.0 * agree / max(n, 1)
        out["top1_reference"] = 100.0 * ref_correct / max(n, 1)
    return out


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over images of KL(softmax(ref) || softmax(logits)) in nats; both ``[N, classes]`` (computed in
    float64: near-identical models give KLs of 1e-6 that float32 rounding would swamp)."""
    lp_ref, lp = ref_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
    return float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())
