"""Token merging shared by every token-reduction pass: one size-weighted merge, one packed
selection format, token sizes and the proportional-attention bias (export-clean: no scatter ops).

Packed selection (the value a token-reduction layer's tagged node holds, :mod:`vitprune.ir.tags`):
``[B, K + 2r]`` int64 = ``kept [B, K] | src [B, r] | dst [B, r]``, all indices into the layer's
input tokens; ``kept`` ascending (prefix first), ``src[j]`` merged into ``dst[j]``. ToMe's
bipartite matching (``K = N - r``) and Zero-TPrune's merge layers both use it.

Shapes: B batch, N tokens entering the layer (prefix included), C channels, r merged tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from .token_select import gather_tokens

__all__ = ["merge_tokens", "merge_packed", "pack_selection", "unpack_selection", "packed_kept", "unit_sizes", "log_size_bias", "mark"]


def merge_tokens(x: torch.Tensor, size: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                 rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of tokens ``src`` into tokens ``dst`` (ToMe ``merge_wavg``,
    Bolya et al. 2023 §3; ALGORITHMS.md §3).

    ``x'[j] = (s_j x_j + Σ_{i: dst_i = j} s_i x_i) / (s_j + Σ s_i)``; sizes add up. Sources are added
    to their destinations through a one-hot assignment ``[B, R, r]`` (``row == dst``) and a batched
    matmul: ``R·r·(C+1)`` MACs.

    Args:
        x: ``[B, N, C]`` tokens.
        size: ``[B, N, 1]`` token sizes (patches each token stands for).
        src, dst: ``[B, r]`` int64 indices into ``N``.
        rows: ``[B, R]`` indices of the output rows (ToMe: the kept tokens); None: all ``N`` rows,
            the ``src`` rows left as they were (a later gather drops them).

    Returns:
        ``(x' [B, R, C], size' [B, R, 1])`` with ``R = N`` when ``rows`` is None.
    """
    size = size.to(x.dtype)
    xs = x * size
    if rows is None:
        n = x.shape[1]
        targets = torch.arange(n, device=x.device).view(1, n)
        base_x, base_size = xs, size
    else:
        targets = rows
        base_x, base_size = gather_tokens(xs, rows), gather_tokens(size, rows)
    assign = (targets.unsqueeze(-1) == dst.unsqueeze(1)).to(x.dtype)          # [B, R, r] one-hot
    num = base_x + assign @ gather_tokens(xs, src)
    den = base_size + assign @ gather_tokens(size, src)
    return num / den, den


def merge_packed(x: torch.Tensor, size: torch.Tensor, packed: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_tokens` of a packed selection, output rows = its kept tokens:
    ``(x' [B, n_keep, C], size' [B, n_keep, 1])``."""
    kept, src, dst = unpack_selection(packed, n_keep)
    return merge_tokens(x, size, src, dst, rows=kept)


def pack_selection(kept: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``kept | src | dst`` as one ``[B, K + 2r]`` tensor (the module docstring's packed format), so a
    layer has a single node to tag and read for kept-token maps."""
    return torch.cat([kept, src, dst], dim=1)


def unpack_selection(packed: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split :func:`pack_selection`'s output into ``kept [B, n_keep]``, ``src [B, r]``, ``dst [B, r]``."""
    r = (packed.shape[1] - n_keep) // 2
    return packed[:, :n_keep], packed[:, n_keep:n_keep + r], packed[:, n_keep + r:]


def packed_kept(packed: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The kept indices ``[B, n_keep]`` of a packed selection (the gathers read this, so the tagged
    packed node stays in the graph)."""
    return packed[:, :n_keep]


def unit_sizes(x: torch.Tensor) -> torch.Tensor:
    """Initial token sizes ``[B, N, 1]`` (ones) for tokens ``x [B, N, C]``."""
    return torch.ones_like(x[..., :1])


def log_size_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention (ToMe §3): ``log(size)`` as an additive logit bias ``[B, 1, 1, N]`` over keys."""
    return torch.log(size[..., 0]).unsqueeze(1).unsqueeze(1)


def mark(idx: torch.Tensor) -> torch.Tensor:
    """``idx + 0``: a node to carry a kept-token tag when the selection has several outputs."""
    return idx + 0
