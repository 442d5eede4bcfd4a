"""Weighted PageRank (WPR) over an attention graph: Zero-TPrune's I-stage signal.

Source: ALGORITHMS.md §1b Step 1 (Zero-TPrune, Wang et al., CVPR 2024, arXiv 2305.17328).
The attention matrix of one head is the weighted adjacency matrix of a complete directed
graph over tokens (rows = queries attend to columns = keys). A token is important when
important tokens attend to it: ``s <- A^T s``, iterated a fixed number of times from a
uniform start (the CLS token starts ``sqrt(N)`` times larger when ``cls_init``).

No ``1/N`` factor per iteration (it only rescales, and underflows after 30-50 steps;
ALGORITHMS.md §1g): because rows of ``A`` sum to 1, ``A^T`` preserves ``sum(s)``, so the
scores stay a distribution (up to the CLS initial weight). The iteration is expressed as a
batched matrix product ``s[B,H,1,N] @ A[B,H,N,N]`` so FLOPs counters count it:
``iters * H * N^2`` MACs per sample.
"""

from __future__ import annotations

import math

import torch

__all__ = ["wpr", "wpr_macs"]


def wpr(attn: torch.Tensor, iters: int, cls_init: bool = True, num_init: int = 1) -> torch.Tensor:
    """Per-head WPR scores.

    Args:
        attn: ``[B, H, N, N]`` attention probabilities, each row summing to 1 (any float dtype;
            the work is done in float32).
        iters: number of power iterations ``T >= 0`` (fixed; no convergence test).
        cls_init: start the first ``num_init`` tokens (CLS) ``sqrt(N)`` times larger than the
            others (the classification variant); False gives the uniform start ``1/N``.
        num_init: how many leading tokens get the ``sqrt(N)`` start (1 = CLS only).

    Returns:
        ``[B, H, N]`` float32 scores; with ``cls_init=False`` each ``[b, h]`` sums to 1.
    """
    a = attn.float()
    b, h, n, _ = a.shape
    s = torch.full((1, 1, 1, n), 1.0 / n, dtype=torch.float32, device=a.device)
    if cls_init and num_init > 0:
        w = torch.ones(n, dtype=torch.float32, device=a.device)
        w = torch.cat([torch.full((num_init,), math.sqrt(n), dtype=torch.float32, device=a.device), w[num_init:]])
        s = s * w.view(1, 1, 1, n)
    s = s.expand(b, h, 1, n)
    for _ in range(int(iters)):
        s = torch.matmul(s, a)          # s_new[i] = sum_j s[j] * A[j, i]  (= A^T s)
    return s.reshape(b, h, n)


def wpr_macs(num_heads: int, n: int, iters: int) -> int:
    """MACs per sample of :func:`wpr` (what ``FlopCounterMode`` counts / 2)."""
    return int(iters) * num_heads * n * n
