"""HeadPrune: remove whole attention heads (ALGORITHMS.md §2b "Head pruning", RECOMMENDATION:
head score = mean q-k pair score of the head over calibration images), with the same
least-squares recovery of ``proj`` as SNP. Composable with ``snp`` in either order: it works on
whatever per-head widths the graph has.

``head-prune:heads=2`` removes 2 heads in every block; ``heads=1;0;2;...`` per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from torch.fx import GraphModule

from ...errors import InvalidPassConfigError
from ...ir.match import find_attention_sites
from ..base import Pass, PassContext, register_pass
from .engine import BlockPlan, prune_blocks
from .options import BLOCK_BATCH_COST, RecoveryOptions, block_steps
from .surgery import finalize, value_head_dim


@register_pass("head-prune")
@dataclass
class HeadPrune(RecoveryOptions, Pass):
    """Remove ``heads`` heads per block (int for every block, or a per-block list).

    Args (besides the calibration/recovery options of
    :class:`vitprune.passes.snp.options.RecoveryOptions`, with ``augment`` and ``token_weight``
    both ``none`` here):
        heads: heads removed per block; must leave at least one head.

    Raises:
        InvalidPassConfigError: negative counts, a list whose length differs from the depth, or
            a count leaving no head in a block.
    """

    heads: Union[int, list[int], None] = 1
    #: SNP's options that head-prune inherited before it composed the shared options: configs
    #: saved then still load (each at the value head-prune always used)
    retired_options: ClassVar[dict] = dict(preset=None, ratio=None, qk=None, v=None, fc1=None, embed=0.0,
                                           target_gmacs=None, criterion="activation", allocation="uniform",
                                           round_to=None, mix=None, blend=1.0)
    #: no extra calibration views by default (SNP's ``flip+crops`` default was measured for SNP only)
    augment: str = "none"
    #: unweighted refit (``fisher`` weights need SNP's Fisher scores, which head-prune does not compute)
    token_weight: Literal["none", "ln"] = "none"

    def validate(self) -> None:
        super().validate()
        vals = self.heads if isinstance(self.heads, list) else [self.heads]
        if any(not isinstance(h, int) or h < 0 for h in vals):
            raise InvalidPassConfigError(f"head-prune: heads={self.heads!r} must be non-negative integers")
        self.validate_recovery(self.name)

    def rewrite(self, gm: GraphModule, ctx: PassContext) -> GraphModule:
        sites = find_attention_sites(gm)
        counts = self.heads if isinstance(self.heads, list) else [self.heads] * len(sites)
        if len(counts) == 1:
            counts = counts * len(sites)
        if len(counts) != len(sites):
            raise InvalidPassConfigError(f"head-prune: {len(counts)} head counts for a model with {len(sites)} blocks")
        plans = []
        for s, c in zip(sites, counts):
            if c >= s.num_heads:
                raise InvalidPassConfigError(
                    f"head-prune: block {s.block_index} ({s.block_path}) has {s.num_heads} heads; removing {c} leaves none")
            plans.append(BlockPlan(heads=s.num_heads - c, qk=s.head_dim, v=value_head_dim(s), mlp=None))
        if all(c == 0 for c in counts):
            ctx.record(heads_removed=counts)
            return gm
        calib, views = self.augmented_calibration(ctx, self.name)
        batches = -(-int(calib.shape[0]) // (self.batch_size * views))
        with ctx.detail("head-prune") as progress:
            progress.plan(len(sites) * batches * BLOCK_BATCH_COST)
            work, records = prune_blocks(gm, calib, plans, self, views=views,
                                         on_block=block_steps(ctx, progress, len(sites), batches * BLOCK_BATCH_COST))
        out = finalize(work, ctx.example_inputs)
        ctx.record(heads_removed=counts, blocks=records, calibration_images=int(calib.shape[0]) // views,
                   calibration_views=views)
        return out
