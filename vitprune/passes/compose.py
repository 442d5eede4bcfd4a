"""``snp-tokens``: SNP neuron pruning and a token-reduction pass (Zero-TPrune or ToMe) under one
GMACs budget.

The MAC reduction ``R = dense - target_gmacs`` is split: SNP removes ``split * R`` of the dense
model's MACs and the token pass the rest. ``order=snp-first``: SNP to ``D = dense - split * R``,
then the token pass to the target. ``tokens-first`` prunes by the same two factors the other way
round (MACs are close to a product of a neuron factor and a token factor): the token pass to
``dense * target / D``, then SNP to the target (by ``D / dense``), so a split prunes the same
share of neurons and of tokens in both orders. (Splitting ``R`` itself in the token-pruned
model would make SNP prune more neurons in ``tokens-first``: a neuron there saves fewer MACs.)
SNP after a token pass calibrates with the original model's token selections
(:class:`vitprune.passes.snp.engine._Stream`), so both orders are sound.
``split=none`` chooses among ``splits`` by two-fold cross-validation on the calibration images
(no other image is looked at): the composition is fitted on the even-numbered images and scored
on the odd ones, and the other way round; the split with the lowest mean KL divergence of the
class distributions to the original model's is then fitted on all calibration images. KL on the
images a composition was fitted on would favour SNP, whose least-squares refit fits exactly
those images (docs/decisions.md, "Choosing the split").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Literal, Optional

import torch
from torch.fx import GraphModule

from ..errors import InvalidPassConfigError
from ..eval.metrics import kl_divergence
from .base import PASS_REGISTRY, Pass, PassContext, register_pass
from .snp.engine import Criterion
from .snp.options import RecoveryOptions


@register_pass("snp-tokens")
@dataclass
class SNPTokens(RecoveryOptions, Pass):
    """SNP + token reduction at one budget.

    Args (besides SNP's calibration/recovery options, :class:`vitprune.passes.snp.options.RecoveryOptions`):
        target_gmacs: GMACs of the result (required), above what the composition can reach.
        tokens: the token pass, ``zero-tprune`` or ``tome`` (its default options, its own
            ``target_gmacs``).
        order: ``snp-first`` or ``tokens-first``.
        split: fraction of the MAC reduction done by SNP, counted on the dense model, in (0, 1)
            (the same neuron and token shares in both orders, see the module docstring); None: the value of
            ``splits`` with the lowest two-fold cross-validated calibration KL (:meth:`choose_split`;
            two compositions on half the images per value, then one on all of them).
        splits: candidates for ``split=none``, each in (0, 1).
        criterion: SNP's neuron criterion (:class:`vitprune.passes.snp.snp.SNP`).

    Raises:
        InvalidPassConfigError: no ``target_gmacs``, a split outside (0, 1), a budget at or above
            the dense model or below what SNP and the token pass reach together, calibration
            images of another size than the model's input, ``split=none`` with fewer than 4
            calibration images.
    """

    target_gmacs: Optional[float] = None
    tokens: Literal["zero-tprune", "tome"] = "zero-tprune"
    order: Literal["snp-first", "tokens-first"] = "snp-first"
    split: Optional[float] = 0.5
    splits: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    criterion: Criterion = "activation"

    def validate(self) -> None:
        super().validate()
        self.validate_recovery(self.name)
        if self.target_gmacs is None or not self.target_gmacs > 0:
            raise InvalidPassConfigError(f"snp-tokens: give target_gmacs > 0 (got {self.target_gmacs})")
        for s in ([self.split] if self.split is not None else []) + list(self.splits):
            if not 0.0 < s < 1.0:
                raise InvalidPassConfigError(
                    f"snp-tokens: split {s} is outside (0, 1) (the fraction of the MAC reduction SNP does)")
        if self.order == "tokens-first" and self.tokens == "tome" and self.compensate:
            raise InvalidPassConfigError("snp-tokens: order=tokens-first with tokens=tome is not supported "
                                         "(SNP's recovery after ToMe); use order=snp-first")
        if self.split is None and not self.splits:
            raise InvalidPassConfigError("snp-tokens: split=none needs at least one value in splits")

    def snp_pass(self, target: float) -> Pass:
        """The SNP pass with this pass's calibration/recovery options at ``target`` GMACs."""
        shared = {f.name: getattr(self, f.name) for f in fields(RecoveryOptions)}
        return PASS_REGISTRY["snp"](target_gmacs=target, criterion=self.criterion, **shared)

    def token_pass(self, target: float) -> Pass:
        return PASS_REGISTRY[self.tokens](target_gmacs=target)

    def plan(self, dense: float, split: float) -> list[Pass]:
        """The two passes, in order, for a dense model of ``dense`` GMACs."""
        after_snp = dense - split * (dense - self.target_gmacs)      # SNP's share, counted on the dense model
        if self.order == "snp-first":
            return [self.snp_pass(after_snp), self.token_pass(self.target_gmacs)]
        # the same two factors the other way round: tokens keep target / after_snp of the MACs, SNP after_snp / dense
        return [self.token_pass(dense * self.target_gmacs / after_snp), self.snp_pass(self.target_gmacs)]

    def compose(self, gm: GraphModule, ctx: PassContext, split: float) -> tuple[GraphModule, list[dict]]:
        """Run both passes at ``split`` on a copy of ``gm``; returns the graph and their records."""
        from ..ir.flops import gmacs

        dense = gmacs(gm, tuple(ctx.example_inputs[0].shape[1:]))
        if self.target_gmacs >= dense:
            raise InvalidPassConfigError(
                f"snp-tokens: target_gmacs={self.target_gmacs} is not below the dense model's {dense:.4f} GMACs")
        out, records = gm, []
        for p in self.plan(dense, split):
            sub = ctx.fresh()
            try:
                out = p(out, sub)                       # each sub-pass works on its own copy
            except InvalidPassConfigError as e:
                raise InvalidPassConfigError(
                    f"snp-tokens: target_gmacs={self.target_gmacs} with split={split} ({self.order}) asks {p.name} "
                    f"for {p.target_gmacs:.4f} GMACs: {e}") from None
            records.append({"pass": p.name, **sub.info, "target_gmacs": round(p.target_gmacs, 4)})
        return out, records

    def choose_split(self, gm: GraphModule, ctx: PassContext, calib: torch.Tensor) -> tuple[float, dict[float, float]]:
        """The value of ``splits`` with the lowest two-fold cross-validated KL on ``calib`` ``[n, 3, H, W]``
        (the calibration images, :meth:`calibration_images`).

        Fold ``k`` fits the composition on the calibration images of parity ``k`` (even / odd
        positions) and measures the mean KL divergence (original || composed) of the class
        distributions on the other parity; a split's score is the mean of its two folds.

        Returns:
            ``(split, {split: cross-validated KL})``.

        Raises:
            InvalidPassConfigError: fewer than 4 calibration images (two per fold).
        """
        if calib.shape[0] < 4:
            raise InvalidPassConfigError(f"snp-tokens: split=none needs at least 4 calibration images for its two "
                                         f"folds, got {calib.shape[0]}; give more images or a split")
        folds = (calib[0::2], calib[1::2])
        with torch.no_grad():
            refs = [gm(f) for f in folds]
        scores = {}
        for s in self.splits:
            kls = []
            for k in (0, 1):
                out, _ = self.compose(gm, dataclasses.replace(ctx, calibration=folds[k], info={}), s)
                with torch.no_grad():
                    kls.append(kl_divergence(refs[1 - k], out(folds[1 - k])))
            scores[s] = sum(kls) / 2
        return min(scores, key=scores.get), scores

    def rewrite(self, gm: GraphModule, ctx: PassContext) -> GraphModule:
        if self.split is not None:
            out, records = self.compose(gm, ctx, self.split)
            ctx.record(split=self.split, passes=records)
            return out
        calib = self.calibration_images(ctx, self.name)            # loaded once (calib=DIR reads files)
        split, scores = self.choose_split(gm, ctx, calib)
        out, records = self.compose(gm, dataclasses.replace(ctx, calibration=calib, info={}), split)
        ctx.record(split=split, cv_kl={str(k): round(v, 5) for k, v in scores.items()}, passes=records)
        return out
