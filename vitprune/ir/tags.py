"""Node tags that survive re-export, so tools can find what a pass inserted.

``torch.export`` copies ``node.meta["custom"]`` onto every ATen node it traces from a tagged
node, across :func:`vitprune.ir.capture.recapture`. Token-reduction passes tag the node that
computes a layer's token selection; :mod:`vitprune.eval.viz` runs the graph and reads those
values to draw kept-token maps.

Tag value (a JSON-friendly dict under ``TOKEN_SELECT``)::

    {"block": i, "kind": "prune", "tokens_in": N}   # value: kept indices [B, K] (int64)
    {"block": i, "kind": "tome",  "tokens_in": N, "r": r, "n_keep": N - r}
    {"block": i, "kind": "merge", "tokens_in": N, "n_keep": K, "r_s": r}
        # tome / merge value: the packed selection [B, K + 2r] = kept | src | dst of
        # vitprune.ops.merge (merge: Zero-TPrune's merge variant; r = r_S, or r_S + r_I with merge_all)

:func:`decode_selection` reads any of them back as ``(kept, src, dst)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

TOKEN_SELECT = "vitprune_token_select"


def tag_token_select(node: Node, block: int, kind: str, tokens_in: int, **info) -> None:
    """Mark ``node`` as the token selection of pruning/merging layer ``block``.

    ``kind`` is ``"prune"`` (value: kept indices ``[B, K]``, ascending), or ``"tome"`` / ``"merge"``
    (value: a packed selection of :mod:`vitprune.ops.merge`, with ``n_keep`` in ``info``).
    """
    custom = dict(node.meta.get("custom") or {})
    custom[TOKEN_SELECT] = {"block": int(block), "kind": kind, "tokens_in": int(tokens_in), **info}
    node.meta["custom"] = custom


def token_select_tag(node: Node) -> Optional[dict]:
    """The tag dict of ``node``, or None."""
    return (node.meta.get("custom") or {}).get(TOKEN_SELECT)


def token_select_outputs(gm: GraphModule) -> list[tuple[Node, dict]]:
    """The tagged selection values of ``gm``: per tag, the node whose users lie outside the tagged
    group (the group's output), in graph order."""
    out = []
    for node in gm.graph.nodes:
        tag = token_select_tag(node)
        if tag is None or node.op != "call_function" or not _is_tensor(node):
            continue                 # e.g. a batch-size sym_size shared with untagged nodes
        if any(token_select_tag(u) != tag for u in node.users) and not _is_multi_output(node):
            out.append((node, tag))
    return out


def _is_tensor(node: Node) -> bool:
    val = node.meta.get("val")
    return val is None or isinstance(val, torch.Tensor)


def _is_multi_output(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, (tuple, list))


def decode_selection(tag: dict, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(kept [B, K], src [B, r], dst [B, r])`` indices (into the layer's input tokens) of a
    tagged node's value; a pruning layer (``kind="prune"``) merges nothing (``r = 0``)."""
    if tag["kind"] == "prune":
        none = value[:, :0]
        return value, none, none
    from ..ops.merge import unpack_selection

    return unpack_selection(value, tag["n_keep"])
