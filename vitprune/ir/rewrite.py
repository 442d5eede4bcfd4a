"""Small graph-editing helpers shared by passes.

* :func:`set_param`: add or replace parameters of a GraphModule.
* :func:`relax_token_dim`: after a pass changes the token count at some node, make every
  downstream reshape/view infer the token dimension (``-1``) instead of the captured literal.
* :func:`drop_trivial_masks`: remove all-allowed attention masks (Hugging Face builds an
  all-true ``[B, 1, N, N]`` mask) so that token counts can change downstream.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..errors import UnsupportedModelError
from .values import node_values

aten = torch.ops.aten

RESHAPE_OPS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}


def set_param(gm: GraphModule, qualname: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` as parameter ``qualname`` (``"blocks.0.attn.q.weight"``), replacing
    any existing one; missing parent modules are created."""
    *parents, leaf = qualname.split(".")
    mod: nn.Module = gm
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    if leaf in mod._buffers:
        del mod._buffers[leaf]
    mod.register_parameter(leaf, nn.Parameter(tensor.detach().clone(), requires_grad=False))


def copy_source_meta(node: Node, src: Node) -> Node:
    """Give a node inserted by a pass ``src``'s module path and stack trace (``nn_module_stack``,
    ``stack_trace``), so that re-export and error messages place it in ``src``'s block.
    Returns ``node``."""
    node.meta["nn_module_stack"] = dict(src.meta.get("nn_module_stack") or {})
    if src.meta.get("stack_trace"):
        node.meta["stack_trace"] = src.meta["stack_trace"]
    return node


def downstream(node: Node) -> list[Node]:
    """All nodes that (transitively) use ``node``, in graph order."""
    seen: set[Node] = set()
    stack = list(node.users)
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        stack.extend(cur.users)
    return [n for n in node.graph.nodes if n in seen]


def _mentions(dim, n_old: int) -> bool:
    if isinstance(dim, int):
        return dim == n_old
    try:  # symbolic size such as 197*s77
        expr = dim.node.expr
    except AttributeError:
        return False
    return any(int(a) == n_old for a in getattr(expr, "args", ()) if getattr(a, "is_Integer", False))


def relax_token_dim(gm: GraphModule, start: Node, n_old: int) -> int:
    """Make every reshape/view downstream of ``start`` infer the token dimension.

    Captured graphs hard-code the token count N in reshapes (``[B, 197, 3, H, d]``,
    ``[197*B, D]``). After a pass changes N at ``start``, each such shape gets ``-1`` at the
    position that depends on ``n_old``; other inferred (``-1``) positions are replaced by
    their static sizes from the node's metadata. Call :func:`recapture` afterwards.

    Args:
        gm: the graph being rewritten (edited in place).
        start: the node whose output has the new token count.
        n_old: the token count the captured shapes mention.

    Returns:
        the number of reshape nodes rewritten.

    Raises:
        UnsupportedModelError: a reshape mentions the token count in more than one position.
    """
    count = 0
    for node in downstream(start):
        if node.op != "call_function" or node.target not in RESHAPE_OPS:
            continue
        shape = list(node.args[1])
        out = tuple(node.meta["val"].shape)
        hits = [i for i, d in enumerate(out) if _mentions(d, n_old)]
        if not hits:
            continue
        if len(hits) > 1:
            raise UnsupportedModelError(
                f"reshape {node.name} {out} mentions the token count {n_old} twice; cannot change the token count"
            )
        new_shape = []
        for i, (arg, d) in enumerate(zip(shape, out)):
            if i == hits[0]:
                new_shape.append(-1)
            elif isinstance(arg, int) and arg == -1:
                new_shape.append(int(d))
            else:
                new_shape.append(arg)
        node.args = (node.args[0], new_shape) + tuple(node.args[2:])
        count += 1
    return count


def _depends_on_pixels(node: Node) -> bool:
    """True if ``node`` reads the input image other than through its size."""
    stack, seen = [node], set()
    while stack:
        cur = stack.pop()
        if cur in seen or not isinstance(cur, Node):
            continue
        seen.add(cur)
        if cur.op == "placeholder":
            return True
        if cur.op == "call_function" and cur.target is aten.sym_size.int:
            continue
        stack.extend(a for a in cur.all_input_nodes)
    return False


def drop_trivial_masks(gm: GraphModule, example_inputs: tuple) -> int:
    """Remove attention masks that allow everything (all-true bool / all-zero float masks
    computed without reading pixels), so attention no longer mentions a fixed token count.

    Returns:
        the number of masks removed (the graph is edited in place and recompiled).
    """
    from .match import SDPA_OPS  # local import: match imports nothing from here

    candidates: list[tuple[Node, Node]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA_OPS:
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        elif node.target is aten.add.Tensor and any(u.target in (aten.softmax.int, aten._softmax.default) for u in node.users):
            mask = node.args[1]
        else:
            continue
        if isinstance(mask, Node) and not _depends_on_pixels(mask):
            candidates.append((node, mask))
    if not candidates:
        return 0
    values = node_values(gm, example_inputs, {m for _, m in candidates})
    removed = 0
    for node, mask in candidates:
        val = values[mask]
        trivial = bool(val.all()) if val.dtype == torch.bool else bool((val == 0).all())
        if not trivial:
            continue
        if node.target in SDPA_OPS:
            args = list(node.args)
            if len(args) > 3:
                args[3] = None
            node.args = tuple(args)
            if "attn_mask" in node.kwargs:
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
        else:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        removed += 1
    if removed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return removed
