"""Token selection: deterministic top-k with protected prefix tokens, and gathers of kept tokens.

Plain tensor functions that rewritten graphs call (DESIGN.md, ``ops/``). Every function uses
only operations that torch.export, ONNX (dynamo exporter -> onnxruntime) and TVM's Relax
importer all lower, on static counts: comparisons, ``sum``, ``topk``, ``sort`` (not stable),
``gather``, ``index_select``, ``cat``, ``arange``. No ``scatter_reduce``, no boolean-mask indexing, no
data-dependent shapes (TVM_NOTES.md §3).

Tie-breaking (ALGORITHMS.md §1g pitfall 4): ``torch.topk`` returns tied elements in an
unspecified order that differs from ORT/TVM's TopK (TVM_NOTES.md §3), and stable sorts do not
lower to TVM. :func:`order_key` therefore maps the scores to distinct float64 keys in the same
order, ties broken by the lower index (``O(M)`` elementwise ops), so every later
``topk``/``sort`` sees no ties and all backends select exactly the same tokens. (Until
2026-12 this was a pairwise rank, ``O(M^2)`` comparisons per sample; the keys order the
tokens identically at a fraction of the time: docs/decisions.md, "A lean Zero-TPrune selection".)

Shapes: ``B`` batch, ``N`` tokens including the ``P`` prefix tokens (CLS, distillation),
``K`` kept tokens including the prefix tokens, ``C`` channels.
"""

from __future__ import annotations

import torch

__all__ = ["order_key", "select_highest", "select_lowest", "topk_keep", "index_mask", "gather_tokens"]


#: ``2^-26``: each key moves its score by less than a quarter of a float32 ulp (:func:`order_key`).
_KEY_STEP = 2.0 ** -26
#: Added to ``|score|`` so that tied zeros are separated too (below float32's smallest subnormal).
_KEY_FLOOR = 2.0 ** -160


def order_key(scores: torch.Tensor) -> torch.Tensor:
    """Distinct keys that order ``scores`` as ``(score descending, index ascending)`` does.

    ``key_i = s_i - (|s_i| + 2^-160) * i * 2^-26 / M`` in float64. Every float32 score is exact
    in float64, and the index term moves it by less than ``2^-26`` of its magnitude: far less
    than the gap to the next float32 value (at least ``2^-24`` of it), far more than float64's
    rounding (``2^-53``). So keys of different scores keep their order, keys of tied scores
    (``+0`` and ``-0`` included) fall with the index, and no two keys are equal.

    Args:
        scores: ``[B, M]`` float scores (float32 or lower; finite, NaN-free), ``M <= 2^20``.

    Returns:
        ``[B, M]`` float64 keys, pairwise distinct per row: larger key = larger score, or the same
        score at a lower index.
    """
    m = scores.shape[-1]
    s = scores.float().to(torch.float64)
    step = torch.arange(m, device=scores.device, dtype=torch.float64) * (_KEY_STEP / max(m, 1))
    return s - (s.abs() + _KEY_FLOOR) * step


def select_highest(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of a tie-free ``key`` ``[B, M]`` (from :func:`order_key`),
    sorted ascending by index.

    Returns:
        ``[B, k]`` int64 indices into ``M``, ascending.
    """
    idx = torch.topk(key, k, dim=-1, largest=True, sorted=True).indices
    return torch.sort(idx, dim=-1).values


def select_lowest(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries of a tie-free ``key`` ``[B, M]`` (from :func:`order_key`),
    sorted ascending by index: the complement of ``select_highest(key, M - k)``.

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
        kept = select_highest(order_key(rest), k_rest) + num_prefix
    else:
        kept = torch.zeros(b, 0, dtype=torch.int64, device=importance.device)
    if num_prefix == 0:
        return kept
    prefix = torch.arange(num_prefix, device=importance.device).unsqueeze(0).expand(b, num_prefix)
    return torch.cat([prefix, kept], dim=1)


def index_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Which of ``n`` positions ``idx`` names, as a 0/1 mask, without ``scatter`` (it lowers
    everywhere, TVM_NOTES.md §3): ``out[b, j] = #{k : idx[b, k] = j}``.

    Args:
        idx: ``[B, r]`` int64 indices into ``n``, distinct per row (else entries count repeats).
        n: ``N``, the number of positions.

    Returns:
        ``[B, N]`` float32: 1 at the indices ``idx``, 0 elsewhere.
    """
    pos = torch.arange(n, device=idx.device)
    return (idx.unsqueeze(-1) == pos).to(torch.float32).sum(1)


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
