"""The analytic MAC model of a ViT, read from its attention sites, and the one budget bisection.

Every pass, preset and search plans with this model; ``torch.utils.flop_counter``
(:func:`vitprune.ir.flops.gmacs`) measures the result and is the independent check in tests.
Widths are read per block because they differ between blocks after SNP (ALGORITHMS.md §2c).
MACs per image (1 MAC = one multiply-accumulate, half of torch's FLOP count; ALGORITHMS.md §1d).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch.fx import GraphModule

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


@dataclass
class ViTDims:
    """What planning needs of a captured ViT: depth, tokens (prefix included), prefix tokens,
    embedding width, each block's widths, and its dense GMACs measured with the FLOP counter.

    ``heads``, ``head_dim`` and ``mlp_hidden`` are the first block's (the same in every block of an
    unpruned ViT).
    """

    depth: int
    tokens: int
    prefix: int
    embed_dim: int
    dense_gmacs: float
    blocks: list[BlockDims] = field(default_factory=list)

    @classmethod
    def from_graph(cls, gm: GraphModule, sites: Optional[list[AttentionSite]] = None,
                   image_shape=(3, 224, 224)) -> "ViTDims":
        """Read the sites of ``gm`` (found afresh unless given) and measure its GMACs at ``image_shape``."""
        from .flops import gmacs
        from .match import find_attention_sites

        sites = sites if sites is not None else find_attention_sites(gm)
        s0 = sites[0]
        return cls(depth=len(sites), tokens=s0.num_tokens, prefix=s0.num_prefix_tokens, embed_dim=s0.embed_dim,
                   dense_gmacs=gmacs(gm, image_shape), blocks=[BlockDims.from_site(s) for s in sites])

    @property
    def heads(self) -> int:
        return self.blocks[0].heads

    @property
    def head_dim(self) -> int:
        return self.blocks[0].qk

    @property
    def mlp_hidden(self) -> int:
        return self.blocks[0].mlp_hidden

    def dims(self, block: int) -> BlockDims:
        """Widths of ``block``."""
        return self.blocks[block]

    def block_macs(self, n: int, block: int = 0) -> int:
        """MACs of ``block`` on ``n`` tokens (:meth:`BlockDims.block_macs`)."""
        return self.dims(block).block_macs(n, self.embed_dim)


def plain_vit_gmacs(depth: int, tokens: int, dim: int, mlp_ratio: float = 4.0, patch: int = 16,
                    image: int = 224, num_classes: int = 1000, in_chans: int = 3, heads: int = 1) -> float:
    """Analytic GMACs of a plain ViT (DeiT/AugReg layout) from its hyper-parameters: ``depth``
    blocks of :meth:`BlockDims.block_macs` at ``tokens`` tokens (``(4 + 2·mlp_ratio)·N·D² + 2·N²·D``),
    plus the patch embedding ``(image/patch)²·D·3·patch²`` and the head ``D·num_classes``
    (ALGORITHMS.md §1d "FLOPs model for planning")."""
    block = BlockDims(heads=heads, qk=dim // heads, v=dim // heads, mlp_hidden=int(mlp_ratio * dim))
    patch_embed = (image // patch) ** 2 * dim * in_chans * patch * patch
    return (depth * block.block_macs(tokens, dim) + patch_embed + dim * num_classes) / 1e9


def bisect_budget(f: Callable[[float], float], lo: float, hi: float, target: float, iters: int,
                  increasing: bool = True) -> tuple[float, float]:
    """Bisection of a monotone cost ``f`` (GMACs or MACs) for a budget: the final ``(lo, hi)`` after
    ``iters`` halvings, keeping ``f(lo) <= target < f(hi)`` for increasing ``f`` (``f(lo) > target >=
    f(hi)`` for decreasing ``f``). The callers pick the end that suits them (the cheaper one to stay
    within a budget)."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (f(mid) > target) == increasing:
            hi = mid
        else:
            lo = mid
    return lo, hi
