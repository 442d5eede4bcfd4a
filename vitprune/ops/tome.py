"""ToMe token merging as plain, export-clean tensor functions (ALGORITHMS.md §3).

Bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, §3;
reference code ``facebookresearch/ToMe``, ``tome/merge.py``), rewritten so that every op lowers
through torch.export, ONNX (dynamo exporter) and TVM's Relax importer:

* no ``scatter_reduce`` / ``index_add`` (the reference merge uses ``scatter_reduce``): merged tokens
  are summed into their destinations by :func:`vitprune.ops.merge.merge_tokens` (a one-hot
  assignment ``[B, N-r, r]`` and a batched matmul);
* every shape is static (``r`` is a Python int per layer), no boolean-mask reshapes;
* kept tokens stay in their original order (ascending index), so prefix tokens (CLS, dist)
  remain at positions ``0 .. num_prefix-1``.

Shapes: B batch, N tokens entering the merge (prefix included), C channels, r merged tokens.
"""

from __future__ import annotations

import torch

from .merge import pack_selection
from .token_select import index_mask

__all__ = ["bipartite_soft_matching", "max_merge"]


def max_merge(num_tokens: int, num_prefix: int) -> int:
    """The largest ``r`` ToMe allows at a layer with ``num_tokens`` tokens: half of the
    non-prefix tokens (``(N - p) // 2``, ToMe ``tome/merge.py``), which is also the number of
    non-prefix tokens of set A (even positions) when prefix tokens sit at the front."""
    n_a = (num_tokens + 1) // 2
    a_prefix = (num_prefix + 1) // 2
    return max(0, min((num_tokens - num_prefix) // 2, n_a - a_prefix))


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 1) -> torch.Tensor:
    """Choose which tokens to merge (ToMe bipartite soft matching, ALGORITHMS.md §3).

    Tokens are split by position into set A (even indices) and set B (odd indices). Each A token
    finds its most similar B token by cosine similarity of ``metric``; the ``r`` A tokens with the
    highest best-match similarity are merged into their partners. Prefix tokens are protected
    with −∞ similarity: an A-side prefix token is never a source, a B-side one (the DeiT dist
    token at index 1) never a destination.

    Args:
        metric: ``[B, N, d]`` matching feature (ToMe: the block's keys averaged over heads).
        r: number of tokens to merge, ``0 <= r <= max_merge(N, num_prefix)``.
        num_prefix: protected leading tokens (1 for CLS, 2 for CLS + distillation token).

    Returns:
        ``[B, N + r]`` int64, the concatenation of ``kept [B, N-r]`` (original indices of the
        surviving tokens, ascending), ``src [B, r]`` (original indices of the merged A tokens) and
        ``dst [B, r]`` (original index of the B token each source merges into). One packed tensor,
        so that a graph has a single node to read for kept-token maps: the packed selection of
        :mod:`vitprune.ops.merge` (split it with :func:`~vitprune.ops.merge.unpack_selection`,
        ``n_keep = N - r``; merge with :func:`~vitprune.ops.merge.merge_tokens`, ``rows=kept``).

    Raises:
        ValueError: ``r`` outside ``[0, max_merge(N, num_prefix)]``.
    """
    bsz, n, _ = metric.shape
    r_max = max_merge(n, num_prefix)
    if not 0 <= r <= r_max:
        raise ValueError(f"ToMe: r={r} merges at a layer with {n} tokens ({num_prefix} prefix); valid range 0..{r_max}")
    dev = metric.device
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)                    # L2-normalised
    a, b = m[:, 0::2], m[:, 1::2]                                              # [B,Na,d], [B,Nb,d]
    n_a, n_b = a.shape[1], b.shape[1]
    scores = a @ b.transpose(-1, -2)                                           # [B,Na,Nb] cosine
    # protect prefix tokens: even prefix positions are A rows, odd ones B columns
    rows = torch.arange(n_a, device=dev) < (num_prefix + 1) // 2                # [Na] bool
    cols = torch.arange(n_b, device=dev) < num_prefix // 2                      # [Nb] bool
    scores = scores.masked_fill(rows[:, None] | cols[None, :], float("-inf"))
    node_max, node_idx = scores.max(dim=-1)                                    # [B,Na] best B match
    order = node_max.argsort(dim=-1, descending=True)                          # [B,Na]
    src_a = order[:, :r]                                                       # [B,r] A positions
    dst_b = torch.gather(node_idx, 1, src_a)                                   # [B,r] B positions
    src = src_a * 2                                                            # original indices
    dst = dst_b * 2 + 1
    # kept = all tokens except the sources, ascending: sort the key (merged * N + index)
    ar = torch.arange(n, device=dev)
    key = index_mask(src, n).to(torch.int64) * n + ar                          # distinct keys: merged last
    kept = torch.topk(-key, n - r, dim=1, largest=True, sorted=True).indices   # [B,N-r] ascending
    return pack_selection(kept, src, dst)
