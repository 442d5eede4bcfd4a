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
from typing import Optional

import torch

__all__ = ["wpr", "wpr_macs"]


def wpr(attn: torch.Tensor, iters: int, cls_init: bool = True, num_init: int = 1,
        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-head WPR scores, on the whole attention graph or on the sub-graph of the tokens ``mask`` marks.

    Args:
        attn: ``[B, H, N, N]`` attention probabilities, each row summing to 1 (any float dtype;
            the work is done in float32).
        iters: number of power iterations ``T >= 0`` (fixed; no convergence test).
        cls_init: start the first ``num_init`` tokens (CLS) ``sqrt(N)`` times larger than the
            others (the classification variant); False gives the uniform start ``1/N``.
        num_init: how many leading tokens get the ``sqrt(N)`` start (1 = CLS only).
        mask: ``[B, N]`` 0/1 floats, or None (every token). With a mask, WPR runs on the graph of
            the ``K`` marked tokens only: the attention among them with rows re-normalised to sum
            to 1 (ALGORITHMS.md §1b Step 3, the I-stage after the S-stage), ``N`` and the
            ``sqrt(N)`` start read as ``K`` and given to the first ``num_init`` marked tokens.
            The sub-matrix is never gathered: each iteration is ``s <- ((m * s) / r) @ A`` with
            ``r = A @ m`` the rows' mass on the marked tokens, one more ``[N] @ [N, N]`` product
            than without a mask and no ``[B, H, K, K]`` copy (measured: docs/decisions.md, "A lean
            Zero-TPrune selection").

    Returns:
        ``[B, H, N]`` float32 scores; with ``cls_init=False`` each ``[b, h]`` sums to 1. With a
        mask, 0 at unmarked tokens, and the marked ones equal (up to float rounding) the scores of
        ``wpr`` on the ``[B, H, K, K]`` attention among the marked tokens (ascending order), rows
        re-normalised.
    """
    a = attn.float()
    b, h, n, _ = a.shape
    if mask is not None:
        return _wpr_masked(a, iters, cls_init, num_init, mask.float())
    s = torch.full((1, 1, 1, n), 1.0 / n, dtype=torch.float32, device=a.device)
    if cls_init and num_init > 0:
        w = torch.ones(n, dtype=torch.float32, device=a.device)
        w = torch.cat([torch.full((num_init,), math.sqrt(n), dtype=torch.float32, device=a.device), w[num_init:]])
        s = s * w.view(1, 1, 1, n)
    s = s.expand(b, h, 1, n)
    for _ in range(int(iters)):
        s = torch.matmul(s, a)          # s_new[i] = sum_j s[j] * A[j, i]  (= A^T s)
    return s.reshape(b, h, n)


def _wpr_masked(a: torch.Tensor, iters: int, cls_init: bool, num_init: int, mask: torch.Tensor) -> torch.Tensor:
    b, h, n, _ = a.shape
    m = mask.view(b, 1, 1, n)                                         # [B, 1, 1, N]
    k = m.sum(-1, keepdim=True)                                       # [B, 1, 1, 1] marked tokens
    s = m / k                                                         # uniform start on the marked tokens
    if cls_init and num_init > 0:
        first = m * (torch.cumsum(m, -1) <= num_init).to(torch.float32)  # the first num_init marked tokens
        s = s * (1.0 + first * (torch.sqrt(k) - 1.0))
    s = s.expand(b, h, 1, n)
    if int(iters) > 0:
        rows = torch.matmul(m, a.transpose(-1, -2))                   # [B, H, 1, N]: r_i = sum_j A[i, j] m_j
        w = m / rows.clamp_min(1e-30)                                 # 1 / r_i on marked rows, 0 elsewhere
        for _ in range(int(iters)):
            s = torch.matmul(s * w, a)
        s = s * m
    return s.reshape(b, h, n)


def wpr_macs(num_heads: int, n: int, iters: int, masked: bool = False) -> int:
    """MACs per sample of :func:`wpr` on ``n`` tokens (what ``FlopCounterMode`` counts / 2); ``masked``:
    with a ``mask`` (the row-mass product adds one iteration's worth when ``iters > 0``)."""
    extra = 1 if masked and int(iters) > 0 else 0
    return (int(iters) + extra) * num_heads * n * n
