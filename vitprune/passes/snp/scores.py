"""SNP neuron scores (ALGORITHMS.md §2b) and activation-aware alternatives.

* :func:`qk_pair_scores`: ``omega_as[h, n] = sum_{j<=gamma} |cos(u_j, q_n)| |cos(v_j, k_n)|``
  against the top singular components of each head's logit matrix ``S = Q K^T`` (§2b panel a,
  with the rank-1 cosine identity and the thin-QR shortcut: no N x N matrix is formed).
* :func:`redundancy_scores`: ``omega[g, i] = sum_{j, l} (1 - |cos(W[g, i], W[j, l])|)`` over
  weight rows (§2b panel c; value neurons and, by our reading of the figure, fc1 neurons).
* :func:`activation_scores`: ``||a_j|| * ||W_next[:, j]||`` from a Gram matrix of the inputs
  of the following linear (activation-aware alternative, not in the paper).

Ties are broken deterministically towards the lowest index (§2g pitfall 4) by :func:`top_indices`.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def select_gamma(sigma: torch.Tensor, energy: float = 0.9, cap: int = 16) -> torch.Tensor:
    """Smallest ``gamma`` whose top singular values capture ``>= energy`` of ``sum sigma^2``,
    capped at ``cap`` (§2b RECOMMENDATION). ``sigma``: ``[..., r]`` descending -> ``[...]`` long."""
    e = sigma.double() ** 2
    frac = e.cumsum(-1) / e.sum(-1, keepdim=True).clamp_min(EPS)
    gamma = (frac < energy - 1e-12).sum(-1) + 1
    return gamma.clamp(max=min(cap, sigma.shape[-1]))


def qk_pair_scores(q: torch.Tensor, k: torch.Tensor, energy: float = 0.9, cap: int = 16,
                   gamma: int | None = None) -> torch.Tensor:
    """Per-image q-k pair scores (§2b panel a).

    Args:
        q, k: per-head queries and keys ``[B, H, N, d]``.
        energy, cap: choose ``gamma`` per head and image by :func:`select_gamma`.
        gamma: fixed number of singular components (overrides ``energy``).

    Returns:
        ``[B, H, d]`` float64: ``sum_{j<gamma} |cos(u_j, q_n)| * |cos(v_j, k_n)|``, where
        ``S = Q K^T = sum_j sigma_j u_j v_j^T`` (computed from the triangular factors of thin QRs
        ``Q = P1 R1``, ``K = P2 R2`` (see :func:`triangular_factor`) and the singular pairs of the
        small ``M = R1 R2^T``: ``u_j`` from the eigenvectors of ``M M^T``, ``v_j = M^T u_j / sigma_j``;
        only the top ``cap`` (or ``gamma``) pairs are formed).
    """
    # contiguous: per-head views of a fused qkv output are strided, and batched products on them run
    # at half speed
    q = q.to(torch.float64, memory_format=torch.contiguous_format)
    k = k.to(torch.float64, memory_format=torch.contiguous_format)
    r1 = triangular_factor(q)  # [B,H,d,d]
    r2 = triangular_factor(k)
    m = r1 @ r2.transpose(-1, -2)
    lam, us = torch.linalg.eigh(m @ m.transpose(-1, -2))  # ascending; half the time of a batched SVD
    sig = lam.flip(-1).clamp_min(0).sqrt()  # [B,H,r] descending singular values of M (and of S)
    top = min(gamma if gamma is not None else cap, sig.shape[-1])
    us = us.flip(-1)[..., :top]  # [B,H,r,j] left singular vectors
    vs = m.transpose(-1, -2) @ us  # sigma_j v_j
    vs = vs / vs.norm(dim=-2, keepdim=True).clamp_min(EPS)
    # cos(u_j, q_n) with u_j = P1 us[:, j] and q_n = P1 R1[:, n]  ->  us[:, j] . R1[:, n] / |R1[:, n]|
    cq = us.transpose(-1, -2) @ r1 / r1.norm(dim=-2, keepdim=True).clamp_min(EPS)  # [B,H,j,n]
    ck = vs.transpose(-1, -2) @ r2 / r2.norm(dim=-2, keepdim=True).clamp_min(EPS)
    prod = cq.abs() * ck.abs()  # [B,H,j,n]
    if gamma is not None:
        g = torch.full(sig.shape[:-1], top, dtype=torch.long)
    else:
        g = select_gamma(sig, energy, cap)
    mask = torch.arange(top).view(1, 1, -1) < g.unsqueeze(-1)  # [B,H,j]
    return (prod * mask.unsqueeze(-1)).sum(-2)


def triangular_factor(x: torch.Tensor) -> torch.Tensor:
    """``R`` of the thin QR ``x = P R`` up to the signs of its rows, for ``x`` ``[..., N, d]`` float64:
    ``R^T`` is the Cholesky factor of the Gram matrix ``x^T x`` (``R^T R = x^T x``), cheaper than a
    batched QR (measured: docs/decisions.md, "Triangular factors by Cholesky"). The row signs do not
    change :func:`qk_pair_scores` (each cosine enters as an absolute value and singular vectors are
    defined up to sign). Falls back to ``torch.linalg.qr`` when a Gram matrix is not positive definite
    (rank-deficient ``x``, e.g. ``N < d``).

    Returns:
        ``[..., min(N, d), d]`` upper triangular (``[..., d, d]`` whenever the Cholesky succeeds).
    """
    chol, info = torch.linalg.cholesky_ex(x.transpose(-1, -2) @ x)
    if bool((info != 0).any()):
        return torch.linalg.qr(x, mode="r")[1]
    return chol.transpose(-1, -2)


def redundancy_scores(w: torch.Tensor) -> torch.Tensor:
    """``omega[g, i] = sum over all rows (j, l) of (1 - |cos(w[g, i], w[j, l])|)`` (§2b panel c).

    Args:
        w: weight rows grouped ``[G, n, D]`` (value neurons: ``[H, d_v, D]``; fc1: ``[1, M, D]``).

    Returns:
        ``[G, n]`` float64; low = redundant (parallel to many rows). Zero rows score 0.
    """
    flat = w.reshape(-1, w.shape[-1]).double()
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(EPS)
    cos = (unit @ unit.T).abs()
    cos.fill_diagonal_(1.0)
    zero = flat.norm(dim=-1) <= EPS
    s = (1 - cos).sum(-1)
    s[zero] = 0.0
    return s.reshape(w.shape[:-1])


def activation_scores(gram_diag: torch.Tensor, w_next: torch.Tensor) -> torch.Tensor:
    """Activation-aware neuron scores ``||a_j|| * ||W_next[:, j]||``.

    Args:
        gram_diag: ``[M]`` sums of squared activations of each input neuron of the next linear
            over the calibration tokens (diagonal of ``X^T X``).
        w_next: the next linear's weight ``[D_out, M]``.

    Returns:
        ``[M]`` float64 (an upper bound of the output energy that neuron j contributes).
    """
    return gram_diag.double().clamp_min(0).sqrt() * w_next.double().norm(dim=0)


def top_indices(scores: torch.Tensor, keep: int) -> list[int]:
    """Sorted indices of the ``keep`` highest scores, ties to the lowest index."""
    s = scores.double()
    order = sorted(range(s.numel()), key=lambda i: (-float(s[i]), i))
    return sorted(order[:keep])
