"""HeadPrune: remove whole attention heads (ALGORITHMS.md §2b "Head pruning", RECOMMENDATION:
head score = mean q-k pair score of the head over calibration images), with the same
least-squares recovery of ``proj`` as SNP. Composable with ``snp`` in either order: it works on
whatever per-head widths the graph has.

``head-prune:heads=2`` removes 2 heads in every block; ``heads=1;0;2;...`` per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from torch.fx import GraphModule

from ...errors import InvalidPassConfigError
from ...ir.match import find_attention_sites
from ..base import PassContext, register_pass
from .snp import SNP
from .engine import BlockPlan, prune_blocks
from .surgery import finalize, value_head_dim


@register_pass("head-prune")
@dataclass
class HeadPrune(SNP):
    """Remove ``heads`` heads per block (int for every block, or a per-block list).

    Args (besides SNP's calibration/recovery options ``compensate``, ``sequential``, ``calib``,
    ``calib_images``, ``ridge``, ``augment`` and ``token_weight``, both default ``none`` here):
        heads: heads removed per block; must leave at least one head.

    Raises:
        InvalidPassConfigError: negative counts, a list whose length differs from the depth, or
            a count leaving no head in a block.
    """

    heads: Union[int, list[int], None] = 1
    #: no extra calibration views by default (SNP's ``flip+crops`` default was measured for SNP only)
    augment: str = "none"
    #: unweighted refit (SNP's ``fisher`` default was measured for SNP only; head-prune computes no
    #: Fisher scores, so ``fisher`` would be ignored here)
    token_weight: str = "none"

    def validate(self) -> None:
        vals = self.heads if isinstance(self.heads, list) else [self.heads]
        if any(not isinstance(h, int) or h < 0 for h in vals):
            raise InvalidPassConfigError(f"head-prune: heads={self.heads!r} must be non-negative integers")
        for name in ("preset", "ratio", "target_gmacs", "qk", "v", "fc1"):
            if getattr(self, name) is not None:
                raise InvalidPassConfigError(f"head-prune: option {name} belongs to the snp pass")
        super().validate()

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
        calib, views = self.augmented_calibration(ctx)
        work, records = prune_blocks(gm, calib, plans, self.engine_options(ctx, views))
        out = finalize(work, ctx.example_inputs)
        ctx.record(heads_removed=counts, blocks=records, calibration_images=int(calib.shape[0]) // views,
                   calibration_views=views)
        return out
