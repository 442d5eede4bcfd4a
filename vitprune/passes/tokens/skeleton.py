"""The graph plumbing every token-reduction pass shares (Zero-TPrune, ToMe).

A token pass walks the attention sites in order and, at some blocks, replaces a block's tokens
``[B, N, D]`` by fewer ``[B, N', D]``. What is the same for every such pass lives here once:

* the token-size node ``[B, N, 1]`` (patches per token, ones at the first merge) carried from
  layer to layer, and proportional attention (``+log(size)``, ToMe §3) on every later block
  (:func:`vitprune.ir.attention.add_size_bias`);
* replacing the old token node by the new one for every consumer outside the layer's own nodes;
* the source metadata of inserted nodes (so re-export places them in their block);
* after the last layer, relaxing the token count hard-coded in downstream reshapes and
  re-exporting the graph (:func:`vitprune.ir.rewrite.relax_token_dim`,
  :func:`vitprune.ir.capture.recapture`).

The selection itself (what to keep, what to merge) and the schedule are the pass's own.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch.fx import GraphModule, Node

from ...errors import InvalidPassConfigError
from ...ir.attention import add_size_bias
from ...ir.capture import recapture
from ...ir.rewrite import copy_source_meta, relax_token_dim
from ...ir.sites import AttentionSite
from ...ir.tags import token_select_outputs
from ...ops.merge import unit_sizes

#: the pass that writes each kind of token-selection tag (:func:`vitprune.ir.tags.tag_token_select`)
_TAG_PASS = {"prune": "zero-tprune", "merge": "zero-tprune", "tome": "tome"}


def require_unreduced_tokens(name: str, gm: GraphModule, sites: list[AttentionSite]) -> None:
    """Refuse a graph whose blocks do not all see the same number of tokens.

    A token pass plans its schedule from the tokens of the first block and carries token sizes
    from its own first merge; on a graph an earlier token pass already reduced, both would be
    wrong (a silently different model, or a shape error deep inside torch). SNP and head pruning
    change widths, not tokens, and compose with a token pass in either order.

    Raises:
        InvalidPassConfigError: the tokens are already reduced; names the blocks' token counts,
            the earlier layers when they are tagged, and the fix.
    """
    counts = [s.num_tokens for s in sites]
    if len(set(counts)) <= 1:
        return
    by = {}
    for _, tag in token_select_outputs(gm):
        by.setdefault(_TAG_PASS.get(tag["kind"], tag["kind"]), []).append(tag["block"])
    earlier = "; ".join(f"{p} after blocks {sorted(set(b))}" for p, b in by.items()) or "the model itself"
    raise InvalidPassConfigError(
        f"{name}: the tokens are already reduced (blocks see {counts[0]} down to {min(counts)} tokens: {earlier}); "
        "token passes do not stack: put every pruning layer into one zero-tprune (prune_blocks=...) or tome "
        "(r=[...]) pass; snp and head-prune compose with it before or after")


class TokenRewrite:
    """One token-reduction rewrite of ``gm`` (edited in place, then re-exported by :meth:`finish`).

    Args:
        gm: the graph the pass owns.
        tokens: tokens entering the first block (prefix included), as the captured reshapes say.
        proportional: add ``log(size)`` to the attention logits of the blocks after a merge.
    """

    def __init__(self, gm: GraphModule, tokens: int, proportional: bool = True):
        self.gm, self.graph, self.tokens, self.proportional = gm, gm.graph, tokens, proportional
        self.size: Optional[Node] = None          # token sizes [B, N, 1] once something merged
        self.first: Optional[Node] = None         # the first replaced token node

    def enter_block(self, site: AttentionSite, keep_fused: bool = True) -> None:
        """Before a block: proportional attention on it when a merge happened earlier (fused SDPA
        kept where ``keep_fused`` and possible, :func:`~vitprune.ir.attention.add_size_bias`)."""
        if self.size is not None and self.proportional:
            add_size_bias(self.gm, site, self.size, keep_fused=keep_fused)

    def call(self, fn, args: tuple, src: Node, kwargs: Optional[dict] = None) -> Node:
        """Insert ``fn(*args, **kwargs)`` at the current insertion point with ``src``'s source metadata."""
        return copy_source_meta(self.graph.call_function(fn, args, kwargs or {}), src)

    def unit_sizes(self, x: Node) -> Node:
        """The token-size node, made (ones ``[B, N, 1]`` from tokens ``x``) at the first merge."""
        if self.size is None:
            self.size = self.call(unit_sizes, (x,), x)
        return self.size

    def replace(self, old: Node, new: Node, own: Iterable[Node]) -> None:
        """Let every consumer of ``old`` outside the layer's ``own`` nodes read ``new``."""
        own = tuple(own)
        old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in own)
        self.first = self.first or new

    def finish(self, example_inputs: tuple) -> GraphModule:
        """Relax downstream token counts and re-export; ``gm`` as it is when no layer replaced tokens."""
        if self.first is None:
            return self.gm
        relax_token_dim(self.gm, self.first, self.tokens)
        return recapture(self.gm, example_inputs)
