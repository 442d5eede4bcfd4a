"""Combine per-head token scores: EIR (root-mean-square over heads) restricted by VHF.

Source: ALGORITHMS.md §1b Step 2 (Zero-TPrune). VHF (variance-based head filter) keeps the
heads whose score variance over tokens lies in ``[vmin, vmax]``: very high variance = a head
that pours its score onto a few (often border) tokens, very low = a near-uniform head. EIR
(emphasising informative regions) combines the kept heads by root-mean-square, so that a
token that matters a lot in one head outranks one that is mediocre in all.

The variance scale is not published (ALGORITHMS.md §1b, [U]); ``var_norm`` selects it:

* ``"mean1"`` (default, the recommendation): variance of ``s / mean(s)`` (= ``N·s`` for
  scores summing to 1): 0 for uniform, ``N - 1`` for one-hot.
* ``"sum_sq_dev"``: ``N · Var(s / sum(s)) = sum_i (p_i - 1/N)^2`` in ``[0, 1)``.
* ``"raw"``: the population variance of ``s`` as given (below ~0.005 for N=197, so the
  default band rejects every head and the fallback applies).

When no head of a sample passes, all heads are used for that sample (fallback).
All ops are elementwise/reductions: nothing data-dependent in shapes.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["VAR_NORMS", "head_variance", "eir_vhf"]

VAR_NORMS = ("mean1", "sum_sq_dev", "raw")


def head_variance(s: torch.Tensor, var_norm: str = "mean1", mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-head variance of token scores under the chosen normalisation.

    Args:
        s: ``[B, H, N]`` non-negative scores.
        var_norm: one of :data:`VAR_NORMS`.
        mask: ``[B, N]`` 0/1 floats, or None: the variance over the marked tokens only (``N`` read
            as their count), as if the others were not there.

    Returns:
        ``[B, H]`` float32 variances.
    """
    s = s.float()
    if mask is None:
        m, n = None, s.shape[-1]
    else:
        m = mask.float().unsqueeze(1)                                  # [B, 1, N]
        n = m.sum(-1, keepdim=True)                                    # [B, 1, 1]

    def mean(t):
        return t.mean(-1, keepdim=True) if m is None else (t * m).sum(-1, keepdim=True) / n

    if var_norm == "mean1":
        t = s / mean(s).clamp_min(1e-30)
    elif var_norm == "sum_sq_dev":
        t = s / (s if m is None else s * m).sum(-1, keepdim=True).clamp_min(1e-30)
    elif var_norm == "raw":
        t = s
    else:
        raise ValueError(f"var_norm must be one of {VAR_NORMS}, got {var_norm!r}")
    var = mean((t - mean(t)) ** 2)
    if var_norm == "sum_sq_dev":
        var = var * n
    return var.squeeze(-1)


def eir_vhf(s: torch.Tensor, vmin: float = 0.01, vmax: float = 0.7, var_norm: str = "mean1",
            use_vhf: bool = True, return_mask: bool = False, mask: Optional[torch.Tensor] = None):
    """Token importance from per-head scores: RMS over the heads that pass the variance band.

    Args:
        s: ``[B, H, N]`` per-head scores (e.g. from :func:`vitprune.ops.wpr.wpr`).
        vmin, vmax: the VHF band (inclusive).
        var_norm: variance normalisation, see the module docstring.
        use_vhf: False = plain EIR over all heads.
        return_mask: also return the ``[B, H]`` float mask of heads used.
        mask: ``[B, N]`` 0/1 floats, or None: the head variances are taken over the marked tokens
            only (scores from :func:`vitprune.ops.wpr.wpr` with the same mask); the importance
            of unmarked tokens is meaningless (0 for such scores).

    Returns:
        ``[B, N]`` float32 importance (and the head mask when ``return_mask``).
    """
    s = s.float()
    if use_vhf:
        v = head_variance(s, var_norm, mask)
        eta = ((v >= vmin) & (v <= vmax)).to(torch.float32)          # [B, H]
        none = (eta.sum(-1, keepdim=True) == 0).to(torch.float32)     # [B, 1]: fallback to all heads
        eta = eta + none * (1.0 - eta)
    else:
        eta = torch.ones(s.shape[:2], dtype=torch.float32, device=s.device)
    num = (eta.unsqueeze(-1) * s * s).sum(1)
    imp = torch.sqrt(num / eta.sum(-1, keepdim=True))
    return (imp, eta) if return_mask else imp
