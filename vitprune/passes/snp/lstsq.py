"""Closed-form least-squares recovery of a linear layer after input neurons are removed.

Statistics are accumulated over calibration tokens (bounded memory, no activations kept):
``A = [X, 1]^T [X, 1]`` (``[M+1, M+1]``) and ``C = [X, 1]^T T`` (``[M+1, D]``), where ``X``
``[tokens, M]`` is the layer input and ``T`` ``[tokens, D]`` the target output.

Refit (ridge, ``lambda = ridge * mean(diag A_SS)``) for kept inputs ``S``:
``[W'^T; b'] = (A_SS + lambda I)^-1 (C_S + lambda [W0^T; 0])``, with the bias row never
regularised. ``W0`` (the prior) is 0 for plain ridge or the original weights of the kept
inputs: the fit is then shrunk towards "no recovery" instead of towards zero, and large
``lambda`` reproduces the sliced layer (issue 4 item 5; Kwon et al. 2022 "least-squares mask
tuning" uses the same normal equations). :func:`cv_ridge` picks ``lambda`` by two-fold
cross-validation over calibration images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class LinearStats:
    """Running sums for one linear layer: ``A`` ``[M+1, M+1]``, ``C`` ``[M+1, D]``, ``tt`` =
    ``sum ||T||^2`` and the token count (float64)."""

    A: torch.Tensor
    C: torch.Tensor
    tt: float = 0.0
    count: int = 0

    @classmethod
    def zeros(cls, m: int, d: int) -> "LinearStats":
        return cls(torch.zeros(m + 1, m + 1, dtype=torch.float64), torch.zeros(m + 1, d, dtype=torch.float64))

    def add(self, x: torch.Tensor, t: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
        """Accumulate inputs ``x`` ``[..., M]`` and targets ``t`` ``[..., D]``, optionally with
        per-token weights ``weight`` ``[...]`` (weighted least squares)."""
        # products in fp32 per batch (fast), sums across batches in fp64; the ones column of [X, 1]
        # is never materialised (a copy of X costs about as much as X^T X)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.reshape(-1, x.shape[-1]).to(dt)
        t = t.reshape(-1, t.shape[-1]).to(dt)
        one = torch.ones(x.shape[0], 1, dtype=dt)
        if weight is not None:
            one = weight.reshape(-1, 1).to(dt).clamp_min(0).sqrt()
            x, t = x * one, t * one
        m = x.shape[1]
        self.A[:m, :m] += symmetric_gram(x)
        xs = (x.T @ one).double()  # [M, 1]
        self.A[:m, m:] += xs
        self.A[m:, :m] += xs.T
        self.A[m:, m:] += float((one.double() ** 2).sum())
        self.C[:m] += (x.T @ t).double()
        self.C[m:] += (one.T @ t).double()
        self.tt += float((t.double() * t.double()).sum())
        self.count += x.shape[0]

    def __add__(self, other: "LinearStats") -> "LinearStats":
        return LinearStats(self.A + other.A, self.C + other.C, self.tt + other.tt, self.count + other.count)

    @property
    def gram_diag(self) -> torch.Tensor:
        """``[M]`` sums of squared inputs."""
        return self.A.diagonal()[:-1]


def symmetric_gram(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``x^T x`` ``[M, M]`` (float64) of ``x`` ``[n, M]``, computed by column blocks of ``block`` on and
    above the diagonal only and mirrored (the work of a symmetric rank-k update, which torch lacks:
    21 of the 36 ``128 x 128`` blocks of a full product for M = 768)."""
    m = x.shape[1]
    if m <= 2 * block:
        return (x.T @ x).double()
    out = torch.empty(m, m, dtype=torch.float64)
    for i in range(0, m, block):
        g = (x[:, i:i + block].T @ x[:, i:]).double()  # [b, M - i]
        b = g.shape[0]
        out[i:i + b, i:] = g
        out[i + b:, i:i + b] = g[:, b:].T
    return out


def _rows(keep: Sequence[int], m: int) -> torch.Tensor:
    return torch.cat([torch.as_tensor(list(keep), dtype=torch.long), torch.tensor([m])])


def reconstruction_error(stats: LinearStats, keep: Sequence[int], weight: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> float:
    """Relative error ``||X_S W^T + b - T||^2 / ||T||^2`` from the statistics alone.

    ``weight`` ``[D, |S|]``, ``bias`` ``[D]`` or None."""
    m = stats.A.shape[0] - 1
    idx = _rows(keep, m)
    weight = weight.detach()
    bias = bias.detach() if bias is not None else None
    wa = torch.cat([weight.double().T, (bias.double() if bias is not None else torch.zeros(weight.shape[0],
                    dtype=torch.float64)).unsqueeze(0)], 0)  # [|S|+1, D]
    a = stats.A[idx][:, idx]
    c = stats.C[idx]
    err = float((wa * (a @ wa)).sum() - 2 * (wa * c).sum() + stats.tt)
    return max(err, 0.0) / max(stats.tt, 1e-30)


def refit(stats: LinearStats, keep: Sequence[int], ridge: float = 1e-3,
          prior: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least-squares weights for the kept inputs.

    Args:
        prior: ``[D, |S|]`` weights to shrink towards (the original layer's kept columns);
            None shrinks towards 0.

    Returns:
        ``weight`` ``[D, |S|]`` and ``bias`` ``[D]`` (float32) minimising
        ``||X_S W^T + b - T||^2 + lambda ||W - prior||^2``.
    """
    m = stats.A.shape[0] - 1
    idx = _rows(keep, m)
    a = stats.A[idx][:, idx].clone()
    c = stats.C[idx].clone()
    lam = ridge * float(a.diagonal()[:-1].mean().clamp_min(1e-30)) if len(idx) > 1 else 0.0
    reg = torch.full((len(idx),), lam, dtype=torch.float64)
    reg[-1] = 0.0
    a += torch.diag(reg)
    if prior is not None:
        c[:-1] += lam * prior.detach().double().T
    sol = torch.linalg.solve(a, c)  # [|S|+1, D]
    return sol[:-1].T.float().contiguous(), sol[-1].float().contiguous()


#: relative ridge strengths tried by :func:`cv_ridge` (1e3: practically the sliced layer)
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e3)


def cv_ridge(folds: Sequence[LinearStats], keep: Sequence[int], prior: Optional[torch.Tensor],
             grid: Sequence[float] = RIDGE_GRID) -> float:
    """The ridge strength of ``grid`` with the lowest two-fold cross-validated error.

    Args:
        folds: statistics of two disjoint halves of the calibration images.
        keep, prior: as in :func:`refit`.

    Returns:
        the chosen relative ridge (fit on one fold, error on the other, summed both ways;
        ties to the smaller value).
    """
    if len(folds) != 2:
        raise ValueError(f"cv_ridge needs 2 folds, got {len(folds)}")
    best, best_err = grid[0], float("inf")
    for lam in grid:
        err = 0.0
        for fit, val in ((folds[0], folds[1]), (folds[1], folds[0])):
            w, b = refit(fit, keep, lam, prior)
            err += reconstruction_error(val, keep, w, b) * max(val.tt, 1e-30)
        if err < best_err - 1e-12 * abs(best_err if best_err != float("inf") else 0.0):
            best, best_err = lam, err
    return best


def cv_error(folds: Sequence[LinearStats], keep: Sequence[int], prior: Optional[torch.Tensor],
             ridge: float) -> float:
    """Two-fold cross-validated relative error of :func:`refit` at ``ridge``: fit on one fold,
    error on the other, summed both ways, over ``tt`` of both folds (an out-of-sample
    counterpart of :func:`reconstruction_error`)."""
    err = 0.0
    for fit, val in ((folds[0], folds[1]), (folds[1], folds[0])):
        w, b = refit(fit, keep, ridge, prior)
        err += reconstruction_error(val, keep, w, b) * max(val.tt, 1e-30)
    return err / max(folds[0].tt + folds[1].tt, 1e-30)


def greedy_lsq_select(stats: LinearStats, groups: Sequence[Sequence[int]], keep_per_group: int,
                      ridge: float = 1e-3) -> list[list[int]]:
    """Choose the inputs to keep by greedy least-squares (Optimal-Brain-Surgeon style) removal.

    Starting from the ridge refit on all inputs, repeatedly remove the input ``j`` whose removal,
    with optimal re-fit of the others, increases the calibration error least:
    ``delta_j = ||w_j||^2 / [A^-1]_jj`` (``w_j`` = row ``j`` of the refit ``[M+1, D]`` solution),
    then downdate ``A^-1`` and the solution (rank-1; Hassibi & Stork 1993; the structured form of
    Kwon et al. 2022's least-squares mask tuning). The bias row is never removed. Inputs are
    removed round-robin over ``groups`` (e.g. heads) so every group keeps ``keep_per_group``.

    Returns:
        per group, the sorted kept indices.
    """
    m = stats.A.shape[0] - 1
    a = stats.A.clone()
    lam = ridge * float(a.diagonal()[:-1].mean())
    a[range(m), range(m)] += lam
    ainv = torch.linalg.inv(a)
    w = ainv @ stats.C  # [M+1, D]
    alive = torch.ones(m + 1, dtype=torch.bool)
    kept = [list(g) for g in groups]
    rounds = len(kept[0]) - keep_per_group
    for _ in range(rounds):
        for gi, g in enumerate(kept):
            idx = torch.as_tensor(g)
            d = ainv.diagonal()[idx].clamp_min(1e-30)
            delta = (w[idx] ** 2).sum(1) / d
            j = int(idx[int(torch.argmin(delta))])
            # OBS update: remove j, compensate the others
            col = ainv[:, j].clone()
            w -= torch.outer(col / ainv[j, j], w[j])
            ainv -= torch.outer(col, col) / ainv[j, j]
            ainv[j, :] = 0
            ainv[:, j] = 0
            w[j] = 0
            alive[j] = False
            g.remove(j)
    return [sorted(g) for g in kept]


def refit_scales(stats: LinearStats, keep: Sequence[int], weight: torch.Tensor,
                 ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares *mask tuning* (Kwon et al. 2022 §4.3): one scale ``m_j`` per kept input
    and a new bias, the weight columns themselves unchanged.

    Minimises ``||X_S diag(m) W_S^T + 1 b^T - T||^2 + lambda ||m - 1||^2`` (``W_S`` =
    ``weight`` ``[D, |S|]``, the kept columns of the original layer; ``lambda = ridge *
    mean(diag G)``) in closed form: with ``G = A_SS * (W_S^T W_S)``, token sums ``s = A_S1``,
    ``n`` tokens and ``t = sum_tokens T``, the bias is ``b = (t - W_S (s * m)) / n`` and
    ``(G - diag(s) W_S^T W_S diag(s) / n + lambda I) m = r - s * (W_S^T t) / n + lambda``,
    ``r_j = W_S[:, j] . C_j``. Only ``|S|`` unknowns: it cannot over-fit the calibration images
    the way a full refit of ``D x |S|`` weights can.

    Returns:
        ``weight`` ``[D, |S|]`` (``W_S diag(m)``) and ``bias`` ``[D]`` (float32).
    """
    m = stats.A.shape[0] - 1
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    w = weight.detach().double()  # [D, S]
    a = stats.A[idx][:, idx]
    s = stats.A[idx, m]  # [S]
    n = float(stats.A[m, m])
    tsum = stats.C[m]  # [D]
    wtw = w.T @ w
    g = a * wtw - torch.outer(s, s) * wtw / n
    r = (w.T * stats.C[idx]).sum(-1) - s * (w.T @ tsum) / n
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-30))
    scale = torch.linalg.solve(g + lam * torch.eye(len(idx), dtype=torch.float64), r + lam)
    w_new = w * scale[None]
    b = (tsum - w_new @ s) / n
    return w_new.float().contiguous(), b.float().contiguous()
