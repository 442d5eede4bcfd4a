"""Zero-TPrune S-stage: remove near-duplicate tokens among the less important half.

Source: ALGORITHMS.md §1b Step 4 (Zero-TPrune; best settings from the paper's ablations:
Sequential-U partition, Key features, cosine similarity, drop instead of merge).

1. The non-prefix tokens are ordered by the I′ importance (descending). The first
   ``ceil(M/2)`` form ``B_set`` (more important half, match targets), the other
   ``floor(M/2)`` form ``A_set`` (prune candidates): "Sequential-U". Prefix tokens (CLS,
   distillation) never enter the partition.
2. Every ``A`` token gets its best cosine similarity to a ``B`` token, on key vectors
   concatenated over heads (``[B, N, H·d]``, the recommendation) or averaged over heads.
3. The ``r_S`` ``A`` tokens with the largest best-match similarity are removed.

Everything uses static counts (``|A|``, ``|B|`` and ``r_S`` follow from ``N``), tie-free order
keys (:func:`.token_select.order_key`) for deterministic ties, ``topk``/``sort``/``gather`` and one
batched matmul (``|A|·|B|·C`` MACs per sample, counted by FLOPs counters).
"""

from __future__ import annotations

import torch

from .token_select import gather_tokens, order_key, select_highest, select_lowest

__all__ = ["key_features", "partition_sizes", "s_stage", "s_stage_macs"]


def key_features(keys: torch.Tensor, feature: str = "concat") -> torch.Tensor:
    """Per-token similarity features from per-head keys.

    Args:
        keys: ``[B, H, N, d]`` key vectors of the block (or already ``[B, N, C]``).
        feature: ``"concat"`` (``[B, N, H·d]``) or ``"mean"`` (``[B, N, d]``, ToMe's choice).

    Returns:
        ``[B, N, F]`` float32, L2-normalised (eps 1e-6).
    """
    k = keys.float()
    if k.dim() == 4:
        b, h, n, d = k.shape
        if feature == "concat":
            k = k.transpose(1, 2).reshape(b, n, h * d)
        elif feature == "mean":
            k = k.mean(1)
        else:
            raise ValueError(f"feature must be 'concat' or 'mean', got {feature!r}")
    return k / k.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def partition_sizes(n: int, num_prefix: int) -> tuple[int, int]:
    """``(|B_set|, |A_set|)`` for ``n`` tokens of which ``num_prefix`` are protected."""
    m = n - num_prefix
    nb = (m + 1) // 2
    return nb, m - nb


def s_stage(feats: torch.Tensor, importance: torch.Tensor, r_s: int, num_prefix: int,
            return_match: bool = False):
    """Indices kept by the S-stage.

    Args:
        feats: ``[B, N, F]`` L2-normalised features (:func:`key_features`).
        importance: ``[B, N]`` I′ importance (larger = more important); prefix entries ignored.
        r_s: number of tokens to remove, ``0 <= r_s <= |A_set| = floor((N - P) / 2)``.
        num_prefix: ``P`` protected leading tokens, always kept.
        return_match: also return, for each removed token, the index of its most similar
            ``B`` token (for the merge variant).

    Returns:
        ``kept [B, N - r_s]`` int64 indices ascending (prefix first); with ``return_match``
        also ``removed [B, r_s]`` and ``target [B, r_s]`` (the matched kept token of each
        removed one), both int64 indices into ``N``.

    Raises:
        ValueError: ``r_s`` outside ``[0, |A_set|]``.
    """
    b, n, _ = feats.shape
    nb, na = partition_sizes(n, num_prefix)
    if not (0 <= r_s <= na):
        raise ValueError(f"s_stage: r_S={r_s} must lie in [0, |A_set|={na}] for N={n}, prefix={num_prefix}")
    dev = feats.device
    key = order_key(importance[:, num_prefix:])                       # [B, M], tie-free
    b_idx = select_highest(key, nb) + num_prefix                      # [B, nb] more important half
    a_idx = select_lowest(key, na) + num_prefix                       # [B, na] less important half
    fa = gather_tokens(feats, a_idx)                                  # [B, na, F]
    fb = gather_tokens(feats, b_idx)                                  # [B, nb, F]
    sim = torch.matmul(fa, fb.transpose(1, 2))                        # [B, na, nb] cosine
    best, best_j = sim.max(dim=-1)                                    # [B, na]
    # keep the na - r_s A tokens with the smallest best-match similarity
    order = order_key(best)                                           # larger = more redundant
    a_keep = gather_tokens(a_idx, select_lowest(order, na - r_s))     # [B, na - r_s]
    parts = [b_idx, a_keep]
    if num_prefix:
        parts.insert(0, torch.arange(num_prefix, device=dev).unsqueeze(0).expand(b, num_prefix))
    kept = torch.sort(torch.cat(parts, dim=1), dim=-1).values
    if not return_match:
        return kept
    drop_pos = select_highest(order, r_s)                             # [B, r_s] positions in A
    removed = gather_tokens(a_idx, drop_pos)
    target = gather_tokens(b_idx, gather_tokens(best_j, drop_pos))
    return kept, removed, target


def s_stage_macs(n: int, num_prefix: int, feat_dim: int) -> int:
    """MACs per sample of :func:`s_stage` (the ``A x B`` cosine matmul)."""
    nb, na = partition_sizes(n, num_prefix)
    return na * nb * feat_dim
