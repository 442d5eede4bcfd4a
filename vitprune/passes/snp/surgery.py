"""Weight surgery in a captured graph: smaller dense q/k/v, proj, fc1/fc2 and residual width.

Every function edits the GraphModule in place (new parameters through
:func:`vitprune.ir.rewrite.set_param`, new ``aten.linear``/``reshape``/``permute`` nodes) and
leaves stale ``meta["val"]``; call :func:`finalize` (dead-code elimination, removal of unused
parameters, :func:`vitprune.ir.capture.recapture`) when done. Nodes of *other* sites stay
valid, so a pass can find the sites once and edit them one after another.

Shapes: per-head tensors ``[B, H, N, d]``; ``qk_keep``/``v_keep`` hold, for every kept head,
the kept neuron indices (same count for every head of a block, ALGORITHMS.md §2g pitfall 2).
The softmax scale stays the original ``head_dim ** -0.5`` (§2g pitfall 1).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.fx import GraphModule, Node

from ...errors import UnsupportedModelError
from ...ir.capture import recapture
from ...ir.match import VIEW_OPS, sdpa_scale
from ...ir.rewrite import RESHAPE_OPS, set_param
from ...ir.sites import AttentionSite

aten = torch.ops.aten


def _meta_from(node: Node) -> dict:
    return {k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta}


def _parent(qualname: str) -> str:
    parts = qualname.split(".")
    return ".".join(parts[:-2]) if len(parts) > 2 else ""


def _batch_dim(x: Node) -> int:
    """Index of the symbolic (batch) dimension of a ``[B, N, D]`` or ``[N, B, D]`` tensor."""
    shape = x.meta["val"].shape
    for i, s in enumerate(shape[:2]):
        if not isinstance(s, int):
            return i
    return 0


def _qkv_weights(gm: GraphModule, site: AttentionSite):
    """Per-head weights ``[H, d, D]`` and biases ``[H, d]`` (or None) of q, k and v, and the
    input node of the projections."""
    H, d = site.num_heads, site.head_dim
    d_v = value_head_dim(site)
    if site.qkv_layout == "fused":
        w = site.qkv.weight_tensor(gm).detach()
        b = site.qkv.bias_tensor(gm)
        if d_v != d:
            raise UnsupportedModelError(f"block {site.block_index}: fused qkv with unequal q/k and v widths")
        ws = w.reshape(3, H, d, -1)
        bs = b.detach().reshape(3, H, d) if b is not None else None
        out = [(ws[i], bs[i] if bs is not None else None) for i in range(3)]
        x = site.qkv.node.args[0]
    else:
        out = []
        for ref, dd in ((site.q_proj, d), (site.k_proj, d), (site.v_proj, d_v)):
            w = ref.weight_tensor(gm).detach()
            b = ref.bias_tensor(gm)
            out.append((w.reshape(H, dd, -1), b.detach().reshape(H, dd) if b is not None else None))
        x = site.q_proj.node.args[0]
        if site.k_proj.node.args[0] is not x or site.v_proj.node.args[0] is not x:
            raise UnsupportedModelError(
                f"block {site.block_index} ('{site.block_path}'): q, k and v read different inputs; "
                "SNP needs self-attention with one input"
            )
    return out, x


def value_head_dim(site: AttentionSite) -> int:
    """Per-head value width ``d_v`` (may differ from the q/k width after SNP)."""
    return int(site.v.meta["val"].shape[-1])


def qkv_head_weights(gm: GraphModule, site: AttentionSite):
    """Public view of the per-head weights: ``[(W [H, d, D], b [H, d] or None)] * 3`` for q, k, v."""
    return _qkv_weights(gm, site)[0]


def _per_head(gm, site, x, name, w, b, meta, before):
    """Insert ``linear(x, w, b)`` + reshape + permute producing ``[B, H', N, d']``."""
    Hn, dn, D = w.shape
    set_param(gm, f"{name}.weight", w.reshape(Hn * dn, D).contiguous())
    if b is not None:
        set_param(gm, f"{name}.bias", b.reshape(Hn * dn).contiguous())
    g = gm.graph
    bd = _batch_dim(x)
    with g.inserting_before(before):
        wn = g.get_attr(f"{name}.weight")
        bn = g.get_attr(f"{name}.bias") if b is not None else None
        lin = g.call_function(aten.linear.default, (x, wn, bn) if bn is not None else (x, wn))
        bsz = g.call_function(aten.sym_size.int, (x, bd))
        if bd == 0:
            shp = g.call_function(aten.reshape.default, (lin, [bsz, -1, Hn, dn]))
            out = g.call_function(aten.permute.default, (shp, [0, 2, 1, 3]))
        else:  # token-major input [N, B, D] (torchvision MultiheadAttention)
            shp = g.call_function(aten.reshape.default, (lin, [-1, bsz, Hn, dn]))
            out = g.call_function(aten.permute.default, (shp, [1, 2, 0, 3]))
    for n in (wn, bn, lin, bsz, shp, out):
        if n is not None:
            n.meta.update(meta)
    return out


def prune_attention(gm: GraphModule, site: AttentionSite, heads: Sequence[int], qk_keep: Sequence[Sequence[int]],
                    v_keep: Sequence[Sequence[int]], proj_weight: Optional[torch.Tensor] = None,
                    proj_bias: Optional[torch.Tensor] = None) -> dict:
    """Replace the q/k/v projections of ``site`` by smaller dense ones and slice ``proj``.

    Args:
        gm: graph edited in place.
        site: the attention site (found on ``gm``).
        heads: kept head indices (sorted), H' of them.
        qk_keep: per kept head, the kept q/k pair indices (``d_qk`` each, SNP §2b panel a).
        v_keep: per kept head, the kept value neuron indices (``d_v`` each, §2b panel c).
        proj_weight, proj_bias: optional replacement of the sliced output projection
            ``[D, H'·d_v]`` / ``[D]`` (least-squares recovery); default: the sliced original.

    Returns:
        ``{"heads": H', "qk": d_qk, "v": d_v}``.

    Raises:
        UnsupportedModelError: q/k/v read different inputs, or the output reshape is not found.
    """
    H, d_v = site.num_heads, value_head_dim(site)
    heads = list(heads)
    if not (len(heads) == len(qk_keep) == len(v_keep)) or not heads:
        raise ValueError(f"block {site.block_index}: heads/qk_keep/v_keep lengths differ or are empty")
    dqk, dv = len(qk_keep[0]), len(v_keep[0])
    if any(len(k) != dqk for k in qk_keep) or any(len(k) != dv for k in v_keep) or dqk == 0 or dv == 0:
        raise ValueError(f"block {site.block_index}: every head must keep the same, non-zero number of neurons")
    (wq, bq), (wk, bk), (wv, bv), = _qkv_weights(gm, site)[0]
    x = _qkv_weights(gm, site)[1]
    qi = torch.tensor(qk_keep)  # [H', dqk]
    vi = torch.tensor(v_keep)
    hi = torch.tensor(heads)

    def take(w, b, idx):
        w2 = torch.stack([w[h][idx[j]] for j, h in enumerate(heads)])
        b2 = torch.stack([b[h][idx[j]] for j, h in enumerate(heads)]) if b is not None else None
        return w2, b2

    first_lin = site.qkv.node if site.qkv is not None else site.q_proj.node
    base = _parent(site.qkv.weight if site.qkv is not None else site.q_proj.weight) or site.block_path
    meta = _meta_from(first_lin)
    core0 = site.core[0]
    old_scale = None
    if site.kind == "sdpa":
        sd = core0
        old_scale = sdpa_scale(sd)
    new = {}
    anchor = x.next  # new nodes read only x: insert them right after it
    for key, (w, b), idx in (("q", (wq, bq), qi), ("k", (wk, bk), qi), ("v", (wv, bv), vi)):
        w2, b2 = take(w, b, idx)
        new[key] = _per_head(gm, site, x, f"{base}.snp_{key}", w2, b2, meta, before=anchor)
    for key, old in (("q", site.q), ("k", site.k), ("v", site.v)):
        old.replace_all_uses_with(new[key])
    if site.kind == "sdpa":
        sd = core0
        kwargs = dict(sd.kwargs)
        args = list(sd.args)
        if len(args) > 6:
            args[6] = float(old_scale)
        else:
            kwargs["scale"] = float(old_scale)
        sd.args, sd.kwargs = tuple(args), kwargs
    # output side: reshapes between the core output and proj that flatten heads
    old_width, new_width = H * d_v, len(heads) * dv
    hit = _fix_head_flatten(site, old_width, new_width, d_v, dv)
    if not hit:
        raise UnsupportedModelError(
            f"block {site.block_index} ('{site.block_path}'): no reshape to width {old_width} between the "
            "attention output and the projection; cannot change the value width"
        )
    _keep_input_columns(gm, site.proj, (hi[:, None] * d_v + vi).reshape(-1), proj_weight, proj_bias)
    return {"heads": len(heads), "qk": dqk, "v": dv}


def _keep_input_columns(gm: GraphModule, lin, cols: torch.Tensor, weight: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None) -> None:
    """Make the linear ``lin`` (a ``LinearRef``) read only input columns ``cols``: its weight becomes
    ``W[:, cols]`` (bias kept), or ``weight`` ``[out, len(cols)]`` / ``bias`` ``[out]`` when given
    (the least-squares refit)."""
    if weight is None:
        weight = lin.weight_tensor(gm).detach()[:, cols]
        bias = lin.bias_tensor(gm)
    set_param(gm, lin.weight, weight)
    if bias is not None and lin.bias is not None:
        set_param(gm, lin.bias, bias)


def _fix_head_flatten(site: AttentionSite, old_width: int, new_width: int, old_dv: int, new_dv: int) -> int:
    """Rewrite reshapes on the path attention-output -> proj input: a last dim equal to the
    flattened width ``H·d_v`` becomes ``H'·d_v'``, a per-head last dim ``d_v`` of a 4-D
    reshape becomes ``d_v'``. Returns the number of reshapes met on the path."""
    proj = site.proj.node
    count = 0
    frontier, seen = [site.attn_out], set()
    while frontier:
        cur = frontier.pop()
        if cur in seen or cur is proj:
            continue
        seen.add(cur)
        if cur.op == "call_function" and cur.target in RESHAPE_OPS:
            shape = list(cur.args[1])
            if isinstance(shape[-1], int) and shape[-1] == old_width:
                shape[-1] = new_width
            elif isinstance(shape[-1], int) and shape[-1] == old_dv and len(shape) == 4:
                shape[-1] = new_dv
            cur.args = (cur.args[0], shape) + tuple(cur.args[2:])
            count += 1
        if cur.op == "call_function" and (cur is site.attn_out or cur.target in VIEW_OPS):
            frontier.extend(cur.users)
    return count


def prune_mlp(gm: GraphModule, site: AttentionSite, keep: Sequence[int], fc2_weight: Optional[torch.Tensor] = None,
              fc2_bias: Optional[torch.Tensor] = None) -> int:
    """Keep fc1 rows / fc2 columns ``keep`` (hidden neurons, §2b) of ``site``'s MLP.

    ``fc2_weight`` ``[D, M']`` / ``fc2_bias`` ``[D]`` replace the sliced fc2 (least-squares
    recovery). Returns M'.
    """
    if site.fc1 is None or site.fc2 is None:
        raise UnsupportedModelError(f"block {site.block_index} ('{site.block_path}'): no fc1/fc2 MLP found")
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    w1 = site.fc1.weight_tensor(gm).detach()[idx]
    b1 = site.fc1.bias_tensor(gm)
    set_param(gm, site.fc1.weight, w1)
    if b1 is not None:
        set_param(gm, site.fc1.bias, b1.detach()[idx])
    _keep_input_columns(gm, site.fc2, idx, fc2_weight, fc2_bias)
    return len(idx)


def remove_unused_params(gm: GraphModule) -> None:
    """Delete parameters/buffers that no ``get_attr`` node references any more."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        *parents, leaf = name.split(".")
        mod = gm
        for p in parents:
            mod = getattr(mod, p)
        mod._parameters.pop(leaf, None)
        mod._buffers.pop(leaf, None)


def clean(gm: GraphModule) -> GraphModule:
    """Dead-code elimination, removal of unused parameters and recompilation (no re-export)."""
    gm.graph.eliminate_dead_code()
    remove_unused_params(gm)
    gm.recompile()
    return gm


def finalize(gm: GraphModule, example_inputs) -> GraphModule:
    """:func:`clean` then :func:`recapture` (fresh shapes; proves the result still exports)."""
    clean(gm)
    return recapture(gm, example_inputs)
