"""ExplicitAttention: rewrite fused ``scaled_dot_product_attention`` into explicit ops.

``sdpa(q, k, v, mask, scale)`` becomes ``softmax((q · scale) @ k^T [+ mask]) @ v`` so that the
attention probabilities ``[B, H, N, N]`` exist as a graph value that token-pruning passes
can read (Zero-TPrune I-stage, ALGORITHMS.md §1g pitfall 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.fx import GraphModule

from ..errors import InvalidPassConfigError
from ..ir.attention import make_explicit
from ..ir.capture import recapture
from ..ir.match import find_attention_sites
from .base import Pass, PassContext, register_pass


@register_pass("explicit-attention")
@dataclass
class ExplicitAttention(Pass):
    """Rewrite fused SDPA attention to explicit ``softmax(q @ k^T · scale) @ v``.

    Args:
        blocks: block indices to rewrite (0-based); None rewrites every block.

    The result is numerically the same function (fp32 max abs diff ~1e-6).

    Raises:
        InvalidPassConfigError: a block index outside the model (checked when run).
    """

    blocks: Optional[list[int]] = None

    def validate(self) -> None:
        super().validate()
        if self.blocks is not None and any((not isinstance(b, int)) or b < 0 for b in self.blocks):
            raise InvalidPassConfigError(f"explicit-attention: blocks must be non-negative ints, got {self.blocks}")

    def rewrite(self, gm: GraphModule, ctx: PassContext) -> GraphModule:
        sites = find_attention_sites(gm)
        wanted = set(range(len(sites))) if self.blocks is None else set(self.blocks)
        bad = sorted(b for b in wanted if b >= len(sites))
        if bad:
            raise InvalidPassConfigError(
                f"explicit-attention: block index {bad} outside the model, which has blocks 0..{len(sites) - 1}"
            )
        rewritten = [s.block_index for s in sites if s.block_index in wanted and s.kind == "sdpa"]
        for s in sites:
            if s.block_index in rewritten:
                make_explicit(gm, s)
        ctx.record(blocks_rewritten=rewritten)
        if not rewritten:
            return gm
        return recapture(gm, ctx.example_inputs)
