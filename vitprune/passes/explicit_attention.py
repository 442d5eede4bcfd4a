"""ExplicitAttention: rewrite fused ``scaled_dot_product_attention`` into explicit ops.

``sdpa(q, k, v, mask, scale)`` becomes ``softmax((q · scale) @ k^T [+ mask]) @ v`` so that the
attention probabilities ``[B, H, N, N]`` exist as a graph value that token-pruning passes
can read (Zero-TPrune I-stage, ALGORITHMS.md §1g pitfall 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..errors import InvalidPassConfigError
from ..ir.capture import recapture
from ..ir.match import find_attention_sites
from ..ir.sites import AttentionSite
from .base import Pass, PassContext, register_pass

aten = torch.ops.aten


def explicit_attention_nodes(gm: GraphModule, site: AttentionSite) -> Node:
    """Replace the SDPA node of ``site`` by explicit matmul-softmax-matmul nodes, in place.

    Returns:
        the new softmax node (attention probabilities ``[B, H, N, N]``).
    """
    (sdpa,) = site.core
    q, k, v = sdpa.args[:3]
    # the SDPA op's own scale (site.scale also folds in scalar factors applied to q before it)
    scale = sdpa.kwargs.get("scale") or (sdpa.args[6] if len(sdpa.args) > 6 else None) or site.head_dim ** -0.5
    mask = site.extra.get("attn_mask")
    g = gm.graph
    meta = {"nn_module_stack": sdpa.meta.get("nn_module_stack", {}), "stack_trace": sdpa.meta.get("stack_trace")}
    with g.inserting_before(sdpa):
        # scale q, not the [B, H, N, N] logits (as timm's explicit attention does): N/d times fewer multiplies
        qs = g.call_function(aten.mul.Tensor, (q, float(scale)))
        kt = g.call_function(aten.transpose.int, (k, -2, -1))
        logits = g.call_function(aten.matmul.default, (qs, kt))
        new = [qs, kt, logits]
        if isinstance(mask, Node):
            if mask.meta["val"].dtype == torch.bool:
                logits = g.call_function(aten.masked_fill.Scalar, (logits, g.call_function(aten.logical_not.default, (mask,)), float("-inf")))
                new += [logits.args[1], logits]
            else:
                logits = g.call_function(aten.add.Tensor, (logits, mask))
                new.append(logits)
        probs = g.call_function(aten.softmax.int, (logits, -1))
        out = g.call_function(aten.matmul.default, (probs, v))
        new += [probs, out]
    for n in new:
        n.meta.update(meta)
    sdpa.replace_all_uses_with(out)
    g.erase_node(sdpa)
    return probs


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
                explicit_attention_nodes(gm, s)
        ctx.record(blocks_rewritten=rewritten)
        if not rewritten:
            return gm
        return recapture(gm, ctx.example_inputs)
