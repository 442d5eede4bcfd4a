"""Token selection: deterministic top-k with protected prefix tokens, and gathers of kept tokens.

Plain tensor functions that rewritten graphs call (DESIGN.md, ``ops/``). Every function uses
only operations that torch.export, ONNX (dynamo exporter -> onnxruntime) and TVM's Relax
importer all lower, on static counts: comparisons, ``sum``, ``topk``, ``sort`` (not stable),
``gather``, ``index_select``, ``cat``, ``arange``. No ``scatter_reduce``, no boolean-mask indexing, no
data-dependent shapes (TVM_NOTES.md §3).

Tie-breaking (ALGORITHMS.md §1g pitfall 4): ``torch.topk`` returns tied elements in an
unspecified order that differs from ORT/TVM's TopK (TVM_NOTES.md §3), and stable sorts do not
lower to TVM. :func:`rank_desc` therefore computes each token's rank by explicit pairwise
comparison (``O(N^2)`` per sample, tiny next to attention), with ties broken by the lower
index. Ranks are distinct, so every later ``topk``/``sort`` sees no ties and all backends
select exactly the same tokens.

Shapes: ``B`` batch, ``N`` tokens including the ``P`` prefix tokens (CLS, distillation),
``K`` kept tokens including the prefix tokens, ``C`` channels.
"""

from __future__ import annotations

import torch

__all__ = ["rank_desc", "topk_keep", "gather_tokens", "gather_attention", "select_lowest"]


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every element in descending order of ``scores``, ties broken by lower index.

    Args:
        scores: ``[B, M]`` float scores (NaN-free).

    Returns:
        ``[B, M]`` float32 ranks: 0 for the largest score, ``M - 1`` for the smallest; a
        permutation of ``0..M-1`` per row (exact in fp32 up to M = 2^24).
    """
    m = scores.shape[-1]
    s = scores.float()
    si = s.unsqueeze(-1)                       # [B, M, 1]  (element i)
    sj = s.unsqueeze(-2)                       # [B, 1, M]  (element j)
    pos = torch.arange(m, device=scores.device)
    j_before_i = (pos.unsqueeze(0) < pos.unsqueeze(1)).unsqueeze(0)   # [1, M, M]: j < i
    beats = (sj > si) | ((sj == si) & j_before_i)                    # j ranks before i
    return beats.to(torch.float32).sum(-1)


def select_lowest(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries of a tie-free ``key`` ``[B, M]``, sorted ascending
    by index. ``key`` must have distinct values per row (e.g. ranks from :func:`rank_desc`).

    Returns:
        ``[B, k]`` int64 indices into ``M``, ascending.
    """
    idx = torch.topk(key, k, dim=-1, largest=False, sorted=True).indices
    return torch.sort(idx, dim=-1).values


def topk_keep(importance: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """Indices of the tokens to keep: the prefix tokens plus the ``keep - num_prefix`` most
    important other tokens, sorted ascending (spatial order is preserved).

    Args:
        importance: ``[B, N]`` scores, larger = more important; the first ``num_prefix``
            entries (CLS, distillation token) are ignored: those tokens are always kept.
        keep: ``K``, total number of tokens kept **including** the prefix tokens;
            ``num_prefix <= keep <= N``.
        num_prefix: ``P``, number of leading protected tokens.

    Returns:
        ``[B, K]`` int64 indices into ``N``, ascending; the first ``P`` columns are ``0..P-1``.
        Ties in ``importance`` are broken by the lower index, identically on every backend.

    Raises:
        ValueError: ``keep`` outside ``[num_prefix, N]``.
    """
    b, n = importance.shape
    if not (num_prefix <= keep <= n):
        raise ValueError(f"topk_keep: keep={keep} must lie in [num_prefix={num_prefix}, N={n}]")
    rest = importance[:, num_prefix:]
    k_rest = keep - num_prefix
    if k_rest > 0:
        kept = select_lowest(rank_desc(rest), k_rest) + num_prefix
    else:
        kept = torch.zeros(b, 0, dtype=torch.int64, device=importance.device)
    if num_prefix == 0:
        return kept
    prefix = torch.arange(num_prefix, device=importance.device).unsqueeze(0).expand(b, num_prefix)
    return torch.cat([prefix, kept], dim=1)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of every sample: ``out[b, k] = x[b, idx[b, k]]``.

    Args:
        x: ``[B, N, C]`` tokens (or ``[B, N]``: a per-token value such as token sizes).
        idx: ``[B, K]`` int64 indices into ``N``.

    Returns:
        ``[B, K, C]`` (or ``[B, K]``), same dtype as ``x``.

    ``[B, N, C]`` tokens are gathered as whole rows: ``index_select`` on ``x`` viewed as
    ``[B·N, C]`` with ``idx + b·N`` (ONNX ``Gather``, TVM ``take``), which copies ``C`` contiguous
    values per kept token instead of reading one index per element as ``torch.gather`` with an
    expanded index does (measured: docs/decisions.md, "Token gathers as ``index_select``").
    """
    if x.dim() == 2:
        return torch.gather(x, 1, idx)
    b, n, c = x.shape
    rows = idx + torch.arange(b, device=idx.device).unsqueeze(1) * n                # [B, K] into B·N
    return x.reshape(b * n, c).index_select(0, rows.reshape(-1)).view(b, idx.shape[1], c)


def gather_attention(attn: torch.Tensor, idx: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    """The attention sub-matrix among kept tokens, rows re-normalised to sum to 1.

    Row re-normalisation of softmax probabilities equals re-applying softmax to the logits
    over the kept keys (ALGORITHMS.md §1b Step 3 recommendation).

    Args:
        attn: ``[B, H, N, N]`` attention probabilities (rows = queries).
        idx: ``[B, K]`` kept indices.
        renormalize: divide each row by its sum.

    Returns:
        ``[B, H, K, K]`` with ``out[b, h, i, j] = attn[b, h, idx[b, i], idx[b, j]]`` (normalised).
    """
    b, h, n, _ = attn.shape
    k = idx.shape[1]
    # whole rows (gather_tokens with every head as a sample), then the columns by gather
    rows = gather_tokens(attn.reshape(b * h, n, n), idx.unsqueeze(1).expand(b, h, k).reshape(b * h, k))
    rows = rows.view(b, h, k, n)                                                # [B,H,K,N]
    sub = torch.gather(rows, 3, idx[:, None, None, :].expand(b, h, k, k))       # [B,H,K,K]
    if renormalize:
        sub = sub / sub.sum(-1, keepdim=True).clamp_min(1e-30)
    return sub
