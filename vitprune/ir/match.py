"""Subgraph matching: find every multi-head self-attention layer in a captured ViT graph.

Matching is structural (ATen ops and data flow), helped by ``nn_module_stack`` metadata only
to name blocks. Recognised forms:

* attention core: fused ``aten.scaled_dot_product_attention`` or explicit
  ``softmax(q @ k^T · scale [+ mask]) @ v`` (scale on q or on the logits, mul or div);
* projections: one fused qkv linear split by reshape/unbind/select (timm, torchvision's
  ``nn.MultiheadAttention``) or three separate q/k/v linears (Hugging Face);
* the block around it: output projection, residual adds, MLP linears.
"""

from __future__ import annotations


import operator
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..errors import UnsupportedModelError
from .sites import AttentionSite, LinearRef

aten = torch.ops.aten

#: ops that only move or relabel data (walked through when tracing q/k/v to their projection).
VIEW_OPS = {
    aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.unbind.int, aten.select.int, aten.squeeze.dim, aten.squeeze.default,
    aten.squeeze.dims, aten.unsqueeze.default, aten.contiguous.default, aten.unflatten.int,
    aten.clone.default, aten.expand.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.detach.default, aten.alias.default, aten.flatten.using_ints,
    aten.slice.Tensor, aten.dropout.default, aten.to.dtype, aten._to_copy.default,
    operator.getitem,
}
SCALAR_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
SDPA_OPS = {aten.scaled_dot_product_attention.default}
ADD_OPS = {aten.add.Tensor}
LINEAR_OPS = {aten.linear.default}
ACT_OPS = {aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default}


def module_path(node: Node) -> str:
    """The module path (``"blocks.3.attn"``) that produced ``node``, from ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _is_scalar(a) -> bool:
    return isinstance(a, (int, float))


def _shape(node: Node) -> tuple:
    val = node.meta.get("val")
    return tuple(val.shape) if val is not None and hasattr(val, "shape") else ()


def _static(dim) -> Optional[int]:
    try:
        return int(dim)
    except (TypeError, ValueError, RuntimeError):
        return None


def _linear_ref(gm: GraphModule, node: Node) -> LinearRef:
    w = node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not isinstance(w, Node) or w.op != "get_attr":
        raise UnsupportedModelError(f"linear {node.name} has a weight that is not a parameter")
    return LinearRef(node=node, weight=w.target, bias=b.target if isinstance(b, Node) else None)


def _producer_linear(gm: GraphModule, node: Node) -> tuple[Optional[LinearRef], float]:
    """Walk back from a per-head tensor through view and scalar ops to the linear producing it.

    Returns the linear (or None) and the product of scalar factors met on the way.
    """
    factor = 1.0
    cur = node
    for _ in range(64):
        if not isinstance(cur, Node) or cur.op != "call_function":
            return None, factor
        if cur.target in LINEAR_OPS:
            return _linear_ref(gm, cur), factor
        if cur.target in SCALAR_OPS and _is_scalar(cur.args[1]):
            factor = factor * cur.args[1] if cur.target in (aten.mul.Tensor, aten.mul.Scalar) else factor / cur.args[1]
            cur = cur.args[0]
        elif cur.target in VIEW_OPS:
            cur = cur.args[0]
        else:
            return None, factor
    return None, factor


def _strip_scalars(node: Node) -> tuple[Node, float]:
    """Follow scalar mul/div ops backwards; return the source node and the accumulated factor."""
    factor = 1.0
    while isinstance(node, Node) and node.op == "call_function" and node.target in SCALAR_OPS and _is_scalar(node.args[1]):
        factor = factor * node.args[1] if node.target in (aten.mul.Tensor, aten.mul.Scalar) else factor / node.args[1]
        node = node.args[0]
    return node, factor


def _only_user(node: Node) -> Optional[Node]:
    users = [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]
    return users[0] if len(users) == 1 else None


def _forward_through(node: Node, ops: set, limit: int = 32) -> Node:
    """Follow single-user chains of ``ops`` forward; return the last node reached."""
    cur = node
    for _ in range(limit):
        nxt = _only_user(cur)
        if nxt is None or nxt.op != "call_function" or nxt.target not in ops:
            return cur
        cur = nxt
    return cur


def _first_user_of(node: Node, targets: set, through: set, limit: int = 64) -> Optional[Node]:
    """Breadth-first search over users of ``node`` (walking ``through`` ops) for one of ``targets``."""
    frontier = list(node.users)
    seen: set = set()
    steps = 0
    while frontier and steps < limit:
        cur = frontier.pop(0)
        steps += 1
        if cur in seen or cur.op != "call_function":
            continue
        seen.add(cur)
        if cur.target in targets:
            return cur
        if cur.target in through:
            frontier.extend(cur.users)
    return None


class _Core:
    def __init__(self, kind, nodes, q, k, v, out, probs, scale, mask):
        self.kind, self.nodes, self.q, self.k, self.v = kind, nodes, q, k, v
        self.out, self.probs, self.scale, self.mask = out, probs, scale, mask


def _explicit_core(sm: Node) -> Optional[_Core]:
    """Recognise ``softmax(q @ k^T · scale [+ mask]) @ v`` around a softmax node."""
    dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim", -1)
    rank = len(_shape(sm))
    if rank < 3 or dim not in (-1, rank - 1):
        return None
    # --- backwards: logits = [mask +] scale * (q @ kT)
    cur, mask, factor = sm.args[0], None, 1.0
    for _ in range(6):
        if not isinstance(cur, Node) or cur.op != "call_function":
            return None
        if cur.target in SCALAR_OPS and _is_scalar(cur.args[1]):
            cur, f = _strip_scalars(cur)
            factor *= f
        elif cur.target in ADD_OPS and isinstance(cur.args[1], Node):
            mask, cur = cur.args[1], cur.args[0]
        elif cur.target in (aten.to.dtype, aten._to_copy.default):
            cur = cur.args[0]
        else:
            break
    if not isinstance(cur, Node) or cur.target not in MATMUL_OPS:
        return None
    logits_mm = cur
    q, qf = _strip_scalars(logits_mm.args[0])
    kt = logits_mm.args[1]
    kt, kf = _strip_scalars(kt)
    if not (isinstance(kt, Node) and kt.target == aten.transpose.int and {kt.args[1], kt.args[2]} in ({-2, -1}, {2, 3})):
        return None
    k = kt.args[0]
    # --- forwards: probs (-> dropout) @ v
    probs_end = _forward_through(sm, {aten.dropout.default, aten.to.dtype, aten._to_copy.default, aten.clone.default})
    out_mm = next((u for u in probs_end.users if u.target in MATMUL_OPS and u.args[0] is probs_end), None)
    if out_mm is None:
        return None
    return _Core("explicit", [logits_mm, sm, out_mm], q, k, out_mm.args[1], out_mm, sm, factor * qf * kf, mask)


def sdpa_scale(node: Node) -> float:
    """The softmax scale of an ``aten.scaled_dot_product_attention`` node: its ``scale`` argument,
    else SDPA's default ``head_dim ** -0.5`` (head dim from q's last size)."""
    scale = node.kwargs.get("scale") or (node.args[6] if len(node.args) > 6 else None)
    return float(scale) if scale is not None else _static(_shape(node.args[0])[-1]) ** -0.5


def _sdpa_core(node: Node) -> _Core:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    scale = sdpa_scale(node)
    q_src, qf = _strip_scalars(q)
    return _Core("sdpa", [node], q_src, k, v, node, None, scale * qf, mask)


def _cores(gm: GraphModule) -> list[_Core]:
    cores = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA_OPS:
            cores.append(_sdpa_core(node))
        elif node.target in SOFTMAX_OPS:
            core = _explicit_core(node)
            if core is not None:
                cores.append(core)
    return cores


def _num_patches(gm: GraphModule) -> Optional[int]:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.conv2d.default, aten.convolution.default):
            shp = _shape(node)
            if len(shp) == 4:
                return _static(shp[2]) * _static(shp[3])
    return None


def _block_path(*nodes: Node) -> str:
    paths = [module_path(n) for n in nodes if n is not None and module_path(n)]
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    common = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common)


def _residual_add(node: Node) -> Optional[Node]:
    """The residual add fed by ``node`` (through dropout, views and layer-scale muls)."""
    through = VIEW_OPS | {aten.mul.Tensor}
    return _first_user_of(node, ADD_OPS, through, limit=16)


def _match_site(gm: GraphModule, core: _Core, index: int, num_patches: Optional[int]) -> AttentionSite:
    qshape = _shape(core.q)
    if len(qshape) != 4:
        raise UnsupportedModelError(
            f"attention core {core.nodes[0].name}: q has shape {qshape}, expected [B, H, N, d]"
        )
    num_heads, num_tokens, head_dim = (_static(s) for s in qshape[1:])
    q_lin, qf = _producer_linear(gm, core.q)
    k_lin, _ = _producer_linear(gm, core.k)
    v_lin, _ = _producer_linear(gm, core.v)
    scale = core.scale * qf if core.kind == "explicit" else core.scale
    if q_lin is None or k_lin is None or v_lin is None:
        raise UnsupportedModelError(
            f"attention core {core.nodes[0].name} in '{module_path(core.nodes[0])}': q, k or v does not come "
            "from a linear projection; vitprune supports fused-qkv and separate q/k/v linears"
        )
    fused = q_lin.node is k_lin.node is v_lin.node
    proj_node = _first_user_of(core.out, LINEAR_OPS, VIEW_OPS)
    if proj_node is None:
        raise UnsupportedModelError(f"attention core {core.nodes[0].name}: no output projection found")
    proj = _linear_ref(gm, proj_node)
    attn_res = _residual_add(proj_node)
    if attn_res is None:
        raise UnsupportedModelError(f"attention block at '{module_path(proj_node)}': no residual add after the projection")
    block_input = next((a for a in attn_res.args if isinstance(a, Node) and not _reaches(proj_node, a)), attn_res.args[0])
    fc1_node = _first_user_of(attn_res, LINEAR_OPS, VIEW_OPS | {aten.layer_norm.default}, limit=8)
    fc1 = _linear_ref(gm, fc1_node) if fc1_node is not None else None
    fc2 = mlp_res = None
    if fc1_node is not None:
        fc2_node = _first_user_of(fc1_node, LINEAR_OPS, VIEW_OPS | ACT_OPS, limit=8)
        if fc2_node is not None:
            fc2 = _linear_ref(gm, fc2_node)
            cand = _residual_add(fc2_node)
            if cand is not None and attn_res in cand.args:
                mlp_res = cand
    embed_dim = _static(_shape(attn_res)[-1])
    prefix = num_tokens - num_patches if num_patches is not None and num_tokens >= num_patches else 0
    return AttentionSite(
        block_index=index,
        block_path=module_path(attn_res) or _block_path(q_lin.node, proj_node),
        qkv_layout="fused" if fused else "separate",
        qkv=q_lin if fused else None,
        q_proj=None if fused else q_lin,
        k_proj=None if fused else k_lin,
        v_proj=None if fused else v_lin,
        q=core.q, k=core.k, v=core.v,
        num_heads=num_heads, head_dim=head_dim, scale=float(scale),
        kind=core.kind, core=core.nodes, attn_probs=core.probs, attn_out=core.out,
        proj=proj, block_input=block_input, attn_residual=attn_res,
        fc1=fc1, fc2=fc2, mlp_residual=mlp_res,
        num_tokens=num_tokens, num_prefix_tokens=prefix, embed_dim=embed_dim,
        extra={"attn_mask": core.mask},
    )


def _reaches(src: Node, dst: Node, limit: int = 64) -> bool:
    """True when ``dst`` is ``src`` or lies downstream of it within ``limit`` steps."""
    frontier, seen = [src], set()
    while frontier and len(seen) < limit:
        cur = frontier.pop()
        if cur is dst:
            return True
        if cur in seen:
            continue
        seen.add(cur)
        frontier.extend(cur.users)
    return False


def find_attention_sites(gm: GraphModule) -> list[AttentionSite]:
    """Find every self-attention layer of a captured ViT, in execution order.

    Args:
        gm: a GraphModule from :func:`vitprune.ir.capture.capture` (or a pass).

    Returns:
        One :class:`AttentionSite` per attention layer, ``block_index`` 0, 1, ...

    Raises:
        UnsupportedModelError: no attention layer was found, or one was found whose q, k or v
            does not come from a linear projection.
    """
    num_patches = _num_patches(gm)
    sites = [_match_site(gm, core, i, num_patches) for i, core in enumerate(_cores(gm))]
    for s in sites[1:]:  # after token pruning fewer tokens than patches remain; the prefix tokens stay
        if num_patches is not None and s.num_tokens < num_patches:
            s.num_prefix_tokens = sites[0].num_prefix_tokens
    if not sites:
        name = gm.meta.get("vitprune_model_class", type(gm).__name__)
        raise UnsupportedModelError(
            f"{name}: found no attention layer (neither scaled_dot_product_attention nor "
            "softmax(q @ k^T) @ v) in the captured graph; vitprune works on Vision Transformers"
        )
    return sites


__all__ = ["find_attention_sites", "module_path", "sdpa_scale", "VIEW_OPS"]


