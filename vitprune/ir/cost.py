"""Per-block MAC model of a ViT, read from its attention sites (shared by the token passes).

Widths are read per block because they differ between blocks after SNP (ALGORITHMS.md §2c);
MACs per image (1 MAC = one multiply-accumulate, half of torch's FLOP count).
"""

from __future__ import annotations

from dataclasses import dataclass

from .sites import AttentionSite


@dataclass
class BlockDims:
    """Widths of one block: heads, q/k and value width per head, MLP hidden."""

    heads: int
    qk: int
    v: int
    mlp_hidden: int

    @classmethod
    def from_site(cls, s: AttentionSite) -> "BlockDims":
        hidden = s.fc1.out_features if s.fc1 is not None else 4 * s.embed_dim
        return cls(heads=s.num_heads, qk=s.head_dim, v=int(s.v.meta["val"].shape[-1]), mlp_hidden=hidden)

    def attn_macs(self, n: int, dim: int) -> int:
        """Attention of ``n`` tokens of width ``dim``: q/k/v projections ``N·D·H·(2 d_qk + d_v)``,
        ``q@kᵀ`` and ``p@v`` ``N²·H·(d_qk + d_v)``, proj ``N·H·d_v·D``."""
        qk, v = self.heads * self.qk, self.heads * self.v
        return n * dim * (2 * qk + v) + n * n * (qk + v) + n * v * dim

    def mlp_macs(self, n: int, dim: int) -> int:
        """MLP of ``n`` tokens: ``2·N·D·M``."""
        return 2 * n * dim * self.mlp_hidden

    def block_macs(self, n: int, dim: int) -> int:
        """Attention and MLP of ``n`` tokens."""
        return self.attn_macs(n, dim) + self.mlp_macs(n, dim)
