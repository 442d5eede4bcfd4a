"""Rewrites of an attention site that keep the :class:`~vitprune.ir.sites.AttentionSite` true.

:func:`make_explicit` turns fused SDPA into explicit ops so the attention probabilities exist as a
graph value (Zero-TPrune's I-stage reads them, ALGORITHMS.md §1g pitfall 1).
:func:`add_size_bias` adds proportional attention after token merging (ToMe §3; Zero-TPrune's
merge variant): a token that stands for ``s`` patches counts ``s`` times in the softmax: ``log(s)`` is added to the
attention logits over keys. Where the block still uses fused attention (SDPA) and nothing else
needs its probabilities, the bias goes in as SDPA's float ``attn_mask`` ``[B, 1, 1, N]``, so the
fused kernel is kept (the explicit form materialises ``[B, H, N, N]`` logits; its cost:
docs/decisions.md, "Proportional attention stays fused"); otherwise it is added to the explicit
logits before the softmax.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .match import sdpa_scale
from .rewrite import copy_source_meta
from .sites import AttentionSite
from ..ops.merge import log_size_bias

aten = torch.ops.aten


def make_explicit(gm: GraphModule, site: AttentionSite) -> Node:
    """Replace the SDPA node of ``site`` by explicit ``softmax((q · scale) @ k^T [+ mask]) @ v`` nodes,
    in place, and update ``site`` (``kind="explicit"``, ``attn_probs``, ``core``, ``attn_out``). A site that is
    already explicit is left as it is.

    Returns:
        the attention-probabilities node ``[B, H, N, N]`` (the softmax).
    """
    if site.kind == "explicit":
        return site.attn_probs
    (sdpa,) = site.core
    q, k, v = sdpa.args[:3]
    scale = sdpa_scale(sdpa)      # the op's own scale (site.scale also folds in factors applied to q before it)
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
    site.kind, site.attn_probs, site.core, site.attn_out = "explicit", probs, [new[2], probs, out], out
    return probs



def add_size_bias(gm: GraphModule, site: AttentionSite, size: Node, keep_fused: bool = True) -> None:
    """Add ``log(size)`` over keys to the attention logits of ``site``, in place.

    Args:
        gm: graph edited in place.
        site: the attention site; an SDPA site stays fused when ``keep_fused`` and it has no
            mask of its own, else it is made explicit (``site.kind`` becomes ``"explicit"``).
        size: node holding the token sizes ``[B, N, 1]`` (patches per token) entering the block.
    """
    g = gm.graph
    if keep_fused and site.kind == "sdpa" and site.extra.get("attn_mask") is None:
        sdpa = site.core[0]
        with g.inserting_before(sdpa):
            bias = copy_source_meta(g.call_function(log_size_bias, (size,)), sdpa)     # [B, 1, 1, N]
        if len(sdpa.args) > 3:
            sdpa.args = sdpa.args[:3] + (bias,) + sdpa.args[4:]
        else:
            sdpa.kwargs = {**sdpa.kwargs, "attn_mask": bias}
        site.extra["attn_mask"] = bias
        return
    probs = make_explicit(gm, site)
    logits = probs.args[0]
    with g.inserting_before(probs):
        bias = copy_source_meta(g.call_function(log_size_bias, (size,)), probs)
        biased = copy_source_meta(g.call_function(aten.add.Tensor, (logits, bias)), probs)
    probs.replace_input_with(logits, biased)
