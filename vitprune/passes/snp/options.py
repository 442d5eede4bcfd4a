"""The calibration and least-squares recovery options shared by ``snp`` and ``head-prune``.

Both passes inherit these dataclass fields (so specs and JSON configs stay flat:
``snp:ridge=0.1``); the engine (:func:`vitprune.passes.snp.engine.prune_blocks`) reads them from
this one object. ``head-prune`` only overrides two defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from ...calibration import augment_views, parse_augment
from ...data import default_eval_transform, load_calibration_images
from ...errors import InvalidPassConfigError

Shrink = Literal["zero", "original"]
TokenWeight = Literal["none", "ln", "fisher"]
Recovery = Literal["full", "scale"]


@dataclass
class RecoveryOptions:
    """Calibration images and the least-squares recovery of ``proj`` / ``fc2``.

    Args:
        compensate: refit proj/fc2 by ridge least squares on calibration activations.
        sequential: feed each block the already pruned model's activations.
        calib: image folder for calibration (else ``compile(calibration=...)``).
        calib_images: number of calibration images.
        ridge: relative ridge strength of the refit; None: chosen per layer from ``1e-3 .. 1e3``
            by two-fold cross-validation over the calibration images
            (:func:`vitprune.passes.snp.lstsq.cv_ridge`).
        shrink: the refit is shrunk towards ``zero`` (plain ridge) or the ``original`` weights of
            the kept inputs.
        token_weight: per-token weights of the refit: ``none``, ``ln`` (``1 / var`` over channels
            of the original residual stream) or ``fisher`` (``||dL/dh_t||^2`` of the original
            model; needs Fisher scores, which only ``snp`` computes).
        augment: extra deterministic views of every calibration image
            (:func:`vitprune.calibration.augment_views`).
        recovery: ``full`` refits every weight of proj/fc2 (and the bias); ``scale`` fits one
            scale per kept input and the bias (Kwon et al. 2022 §4.3).
        batch_size: calibration images per batch (each with all its views).
    """

    compensate: bool = True
    sequential: bool = True
    calib: Optional[str] = None
    calib_images: int = 64
    ridge: Optional[float] = None
    shrink: Shrink = "original"
    token_weight: TokenWeight = "fisher"
    augment: str = "flip+crops"
    recovery: Recovery = "full"
    batch_size: int = 16

    def validate_recovery(self, name: str) -> None:
        """Check these options' ranges (``name``: the pass, for the message; the ``Literal`` choices are
        checked by :meth:`vitprune.passes.base.Pass.validate`); raises InvalidPassConfigError."""
        if self.calib_images < 1:
            raise InvalidPassConfigError(f"{name}: calib_images={self.calib_images} must be >= 1")
        if self.batch_size < 1:
            raise InvalidPassConfigError(f"{name}: batch_size={self.batch_size} must be >= 1")
        if self.ridge is not None and self.ridge < 0:
            raise InvalidPassConfigError(f"{name}: ridge={self.ridge} must be >= 0 (or none: cross-validated)")
        try:
            parse_augment(self.augment)
        except ValueError as e:
            raise InvalidPassConfigError(f"{name}: {e}") from None

    def calibration_images(self, ctx, name: str) -> torch.Tensor:
        """``[n, 3, H, W]``: ``ctx.calibration`` (first ``calib_images``) or images from ``calib``.

        Raises:
            InvalidPassConfigError: neither is given, or the images are not the size of the
                model's input (``ctx.example_inputs``).
        """
        size = tuple(int(s) for s in ctx.example_inputs[0].shape[-2:])
        if ctx.calibration is not None:
            images = ctx.calibration[: self.calib_images]
        elif self.calib is None:
            raise InvalidPassConfigError(
                f"{name}: needs calibration images: pass calib=DIR or compile(..., calibration=tensor)")
        else:
            transform = ctx.transform or default_eval_transform(size[-1])   # the model's own rule when known
            images = load_calibration_images(self.calib, self.calib_images, transform)
        if tuple(images.shape[-2:]) != size:
            raise InvalidPassConfigError(
                f"{name}: calibration images are {tuple(images.shape[-2:])} pixels but the model's input is {size}; "
                f"give calibration images of the model's input size")
        return images

    def augmented_calibration(self, ctx, name: str) -> tuple[torch.Tensor, int]:
        """The calibration images with their ``augment`` views and the number of views per image."""
        return augment_views(self.calibration_images(ctx, name), self.augment, self.batch_size)


#: relative cost of the steps on the progress bar, in block passes over one calibration batch:
#: a Fisher batch is a forward and a backward pass through every block (about 3 forwards); a
#: pruned block runs the original block once, the pruned one about twice, and accumulates Grams
FISHER_BATCH_COST, BLOCK_BATCH_COST = 3.0, 5.0


def block_steps(ctx, detail, blocks: int, units: float, what: str = "block") -> Callable[[int], None]:
    """The ``on_block`` callback of :func:`vitprune.passes.snp.engine.prune_blocks` for the progress
    display: shows ``"{what} 1/{blocks}"`` as the pass's step now and the next block's number after
    each block, and advances ``detail`` (:class:`vitprune.progress.Detail`) by ``units`` per block."""
    ctx.step(f"{what} 1/{blocks}")

    def on_block(li: int) -> None:
        detail.advance(units)
        if li + 1 < blocks:
            ctx.step(f"{what} {li + 2}/{blocks}")

    return on_block
