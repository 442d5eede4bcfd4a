"""Proportional attention after token merging (ToMe §3; Zero-TPrune's merge variant).

A token that stands for ``s`` patches counts ``s`` times in the softmax: ``log(s)`` is added to the
attention logits over keys. Where the block still uses fused attention (SDPA) and nothing else
needs its probabilities, the bias goes in as SDPA's float ``attn_mask`` ``[B, 1, 1, N]``, so the
fused kernel is kept (the explicit form materialises ``[B, H, N, N]`` logits and costs about 40 %
more attention time on CPU); otherwise it is added to the explicit logits before the softmax.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .rewrite import copy_source_meta
from .sites import AttentionSite
from ..ops.zero_tprune_layer import log_size_bias
from ..passes.explicit_attention import explicit_attention_nodes

aten = torch.ops.aten


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
    if site.kind == "sdpa":
        site.attn_probs = explicit_attention_nodes(gm, site)
        site.kind = "explicit"
    probs = site.attn_probs
    logits = probs.args[0]
    with g.inserting_before(probs):
        bias = copy_source_meta(g.call_function(log_size_bias, (size,)), probs)
        biased = copy_source_meta(g.call_function(aten.add.Tensor, (logits, bias)), probs)
    probs.replace_input_with(logits, biased)
