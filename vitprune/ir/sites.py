"""Analysis results over a captured graph: one :class:`AttentionSite` per attention layer.

Sites hold pointers to ``torch.fx`` nodes of one GraphModule. They are recomputed by
:func:`vitprune.ir.match.find_attention_sites` whenever a pass needs them and must not be
kept across passes (DESIGN.md, "One IR").

Shape conventions (B = batch, N = tokens incl. prefix tokens, D = embedding width,
H = heads, d = head dim): block input/output ``[B, N, D]``; per-head q/k/v ``[B, H, N, d]``;
attention probabilities ``[B, H, N, N]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch.fx import GraphModule, Node


@dataclass
class LinearRef:
    """One ``aten.linear`` node and the qualified names of its parameters.

    ``weight`` is ``[out_features, in_features]``, ``bias`` ``[out_features]`` (or None).
    """

    node: Node
    weight: str
    bias: Optional[str]

    def weight_tensor(self, gm: GraphModule) -> torch.Tensor:
        return gm.get_parameter(self.weight) if _is_param(gm, self.weight) else gm.get_buffer(self.weight)

    def bias_tensor(self, gm: GraphModule) -> Optional[torch.Tensor]:
        if self.bias is None:
            return None
        return gm.get_parameter(self.bias) if _is_param(gm, self.bias) else gm.get_buffer(self.bias)

    @property
    def out_features(self) -> int:
        return int(self.node.args[1].meta["val"].shape[0])

    @property
    def in_features(self) -> int:
        return int(self.node.args[1].meta["val"].shape[1])


def _is_param(gm: GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False


@dataclass
class AttentionSite:
    """The nodes of one multi-head self-attention layer and of the block around it.

    Attributes:
        block_index: 0-based position of the block in execution order.
        block_path: module path of the block (``"blocks.3"``, ``"encoder.layer.3"``, ...).
        qkv_layout: ``"fused"`` (one linear produces q, k and v, split by ``qkv_split``) or
            ``"separate"`` (three linears).
        qkv: the fused projection ``[D -> 3·H·d]`` (fused layout), else None.
        q_proj, k_proj, v_proj: the separate projections ``[D -> H·d]`` (separate layout), else None.
        q, k, v: the per-head tensors ``[B, H, N, d]`` that enter the attention core.
        num_heads, head_dim: H and d.
        scale: the softmax scale applied to ``q @ k^T`` (``head_dim ** -0.5`` in ViTs).
        kind: ``"sdpa"`` (fused ``scaled_dot_product_attention``) or ``"explicit"``
            (``softmax(q @ k^T · scale) @ v``).
        core: the core nodes: ``[sdpa]`` or ``[logits_matmul, softmax, probs_matmul]``.
        attn_probs: the softmax node ``[B, H, N, N]`` (explicit kind), else None.
        attn_out: the core output ``[B, H, N, d]``.
        proj: output projection ``[H·d -> D]``.
        block_input: the block's input ``[B, N, D]`` (first residual operand).
        attn_residual: residual add after attention ``[B, N, D]``.
        fc1, fc2: the MLP linears ``[D -> M]`` and ``[M -> D]``.
        mlp_residual: residual add after the MLP = block output ``[B, N, D]``.
        num_tokens: N at this block; num_prefix_tokens: CLS/distillation/register tokens.
        embed_dim: D.
    """

    block_index: int
    block_path: str
    qkv_layout: Literal["fused", "separate"]
    qkv: Optional[LinearRef]
    q_proj: Optional[LinearRef]
    k_proj: Optional[LinearRef]
    v_proj: Optional[LinearRef]
    q: Node
    k: Node
    v: Node
    num_heads: int
    head_dim: int
    scale: float
    kind: Literal["sdpa", "explicit"]
    core: list[Node]
    attn_probs: Optional[Node]
    attn_out: Node
    proj: LinearRef
    block_input: Node
    attn_residual: Node
    fc1: Optional[LinearRef]
    fc2: Optional[LinearRef]
    mlp_residual: Optional[Node]
    num_tokens: int
    num_prefix_tokens: int
    embed_dim: int
    extra: dict = field(default_factory=dict)

    @property
    def block_output(self) -> Node:
        """The node carrying the block's output tokens ``[B, N, D]``."""
        return self.mlp_residual if self.mlp_residual is not None else self.attn_residual

    def summary(self) -> dict:
        """A JSON-friendly description (for ``vitprune info`` and reports)."""
        return {
            "block": self.block_index,
            "path": self.block_path,
            "qkv": self.qkv_layout,
            "kind": self.kind,
            "heads": self.num_heads,
            "head_dim": self.head_dim,
            "scale": round(self.scale, 6),
            "tokens": self.num_tokens,
            "prefix_tokens": self.num_prefix_tokens,
            "embed_dim": self.embed_dim,
            "mlp_hidden": self.fc1.out_features if self.fc1 is not None else None,
        }
