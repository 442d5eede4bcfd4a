"""Residual-stream (embedding) channel pruning, "graph-aware" (ALGORITHMS.md §2b panel e, §2g pitfall 3).

The same channel indices are removed from every tensor tied to the residual stream: patch
embedding conv out-channels, cls/dist tokens and position embedding, every LayerNorm, the
in-columns of q/k/v/fc1 and of the classifier head(s), the out-rows of proj and fc2.

Channel score (§2b RECOMMENDATION, NetsPresso ``Policy.AVERAGE`` + ``TSS_NORM``): the average over
tied tensors of each tensor's per-channel L2 norm divided by its total.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ...errors import UnsupportedModelError
from ...ir.match import find_attention_sites
from ...ir.rewrite import set_param
from .scores import top_indices

aten = torch.ops.aten


def _param(gm: GraphModule, node) -> torch.Tensor:
    name = node.target
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return gm.get_buffer(name)


def tied_tensors(gm: GraphModule) -> dict:
    """``{qualname: axis}``: every parameter tied to the residual stream and the axis of its
    channel dimension. Raises UnsupportedModelError when the layout is not recognised."""
    sites = find_attention_sites(gm)
    D = sites[0].embed_dim
    out_lin, in_lin = set(), set()
    for s in sites:
        out_lin.update(n.node for n in (s.proj, s.fc2) if n is not None)
        in_lin.update(n.node for n in (s.qkv, s.q_proj, s.k_proj, s.v_proj, s.fc1) if n is not None)
    tied: dict = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default:
            w, b = node.args[1], node.args[2] if len(node.args) > 2 else None
            shape = tuple(w.meta["val"].shape) if "val" in w.meta else tuple(_param(gm, w).shape)
            if node in out_lin:
                tied[w.target] = 0
                if isinstance(b, Node):
                    tied[b.target] = 0
            elif node in in_lin or shape[1] == D:
                tied[w.target] = 1
        elif node.target is aten.layer_norm.default:
            if list(node.args[1]) != [D]:
                raise UnsupportedModelError(f"layer_norm {node.name} over {node.args[1]}, expected [{D}]")
            for a in node.args[2:4]:
                if isinstance(a, Node):
                    tied[a.target] = 0
        elif node.target in (aten.conv2d.default, aten.convolution.default):
            tied[node.args[1].target] = 0
            if len(node.args) > 2 and isinstance(node.args[2], Node):
                tied[node.args[2].target] = 0
    for node in gm.graph.nodes:  # cls/dist tokens, position embedding
        if node.op == "get_attr" and node.target not in tied:
            t = _param(gm, node)
            if t.dim() == 3 and t.shape[-1] == D:
                tied[node.target] = 2
    return tied


def channel_scores(gm: GraphModule, tied: dict, dim: int) -> torch.Tensor:
    """``[D]`` average of TSS-normalised per-channel L2 norms over the tied tensors."""
    total = torch.zeros(dim, dtype=torch.float64)
    count = 0
    for name, axis in tied.items():
        t = gm.get_parameter(name).detach().double()
        if t.shape[axis] != dim:
            continue
        norms = t.transpose(0, axis).reshape(dim, -1).norm(dim=1)
        total += norms / norms.sum().clamp_min(1e-12)
        count += 1
    return total / max(count, 1)


def prune_embedding(gm: GraphModule, keep_count: int) -> dict:
    """Keep ``keep_count`` residual channels everywhere they are tied (in place; call
    ``finalize`` afterwards). ``gm`` must have fresh metadata (re-exported).

    Returns:
        ``{"embed": D', "of": D, "tensors": number of tensors sliced}``.
    """
    sites = find_attention_sites(gm)
    D = sites[0].embed_dim
    tied = tied_tensors(gm)
    keep = top_indices(channel_scores(gm, tied, D), keep_count)
    idx = torch.tensor(keep)
    for name, axis in tied.items():
        t = gm.get_parameter(name).detach()
        if t.shape[axis] != D:
            raise UnsupportedModelError(f"parameter {name} {tuple(t.shape)} has no channel axis of size {D}")
        set_param(gm, name, t.index_select(axis, idx).contiguous())
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.layer_norm.default:
            node.args = (node.args[0], [keep_count]) + tuple(node.args[2:])
    gm.recompile()
    return {"embed": keep_count, "of": D, "tensors": len(tied)}
