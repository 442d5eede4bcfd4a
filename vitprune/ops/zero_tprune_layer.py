"""One Zero-TPrune pruning layer as a single tensor function: I′ -> S -> I stages.

Source: ALGORITHMS.md §1b Step 5 (our rendering of the paper's algorithm). The pass
(:mod:`vitprune.passes.tokens.zero_tprune`) inserts a call to :func:`select_tokens` after a block's
output and gathers the kept tokens with :func:`vitprune.ops.token_select.gather_tokens`; the
graph is then re-exported, which unrolls everything below into standard ATen ops.

One function per importance (the pass picks one; nothing branches on an option string here):

* :func:`select_tokens`: Zero-TPrune (I′ -> S -> I with WPR + EIR/VHF).
* :func:`cls_keep`: CLS-attention top-k (EViT/ATS signal): mean over heads of the attention the
  prefix tokens pay to each token; no S-stage (``r_S`` is added to ``r_I``).
* :func:`random_keep`: random dropping. The scores are a fixed pseudo-random permutation of token
  positions drawn from ``seed`` at trace time (a graph constant), so the kept positions are
  random but the same for every image; no S-stage.

The merge variant merges with :mod:`vitprune.ops.merge` (one merge and one packed selection
format for every token pass).
"""

from __future__ import annotations

import random as _random

import torch

from .head_filter import eir_vhf
from .similarity import key_features, s_stage
from .token_select import gather_tokens, index_mask, order_key, select_lowest, topk_keep
from .wpr import wpr

__all__ = ["select_tokens", "cls_keep", "random_keep"]


def _random_scores(b: int, n: int, seed: int, device) -> torch.Tensor:
    rng = _random.Random(seed)
    vals = [rng.random() for _ in range(n)]
    return torch.tensor(vals, dtype=torch.float32, device=device).unsqueeze(0).expand(b, n)


def random_keep(x: torch.Tensor, n_keep: int, num_prefix: int, seed: int = 0) -> torch.Tensor:
    """Random dropping: ``[B, n_keep]`` kept indices of tokens ``x [B, N, C]`` by a fixed
    pseudo-random score per position (same positions for every image), prefix first."""
    return topk_keep(_random_scores(x.shape[0], x.shape[1], seed, x.device), n_keep, num_prefix)


def cls_keep(attn: torch.Tensor, n_keep: int, num_prefix: int) -> torch.Tensor:
    """CLS-attention top-k (the EViT/ATS signal): ``[B, n_keep]`` kept indices, prefix first, by the
    mean over heads of the attention the prefix tokens pay to each token of ``attn [B, H, N, N]``."""
    imp = attn[:, :, :max(num_prefix, 1), :].float().mean(dim=(1, 2))          # [B, N]
    return topk_keep(imp, n_keep, num_prefix)


def select_tokens(attn: torch.Tensor, keys: torch.Tensor, n_after_s: int, n_keep: int, num_prefix: int,
                  iters: int = 5, cls_init: bool = True, vmin: float = 0.01, vmax: float = 0.7,
                  var_norm: str = "mean1", use_vhf: bool = True,
                  feature: str = "concat", pre_iters: int = 1, return_merge: bool = False,
                  merge_all: bool = False):
    """Indices of the tokens a Zero-TPrune pruning layer keeps (I′ -> S -> I stages, ALGORITHMS.md §1b).

    Args:
        attn: ``[B, H, N, N]`` attention probabilities of the block before the layer.
        keys: ``[B, H, N, d]`` keys of that block (S-stage features).
        n_after_s: tokens left after the S-stage, ``N - r_S`` (prefix included).
        n_keep: tokens kept in the end, ``N - r_S - r_I`` (prefix included).
        num_prefix: protected leading tokens (CLS, distillation); always kept.
        iters: WPR iterations of the final I-stage.
        cls_init: CLS starts ``sqrt(N)`` times larger in WPR.
        vmin, vmax, var_norm, use_vhf: VHF band and variance scale (:mod:`.head_filter`).
        feature: S-stage key feature, ``"concat"`` or ``"mean"``.
        pre_iters: WPR iterations of the I′ pre-ranking (1 in the paper).
        return_merge: also return the S-stage pairs (merge variant).
        merge_all: with ``return_merge``, also pair every I-stage-removed token with its most
            similar kept non-prefix token (same key features as the S-stage), so that it is
            merged too instead of dropped. An S-stage target that the I-stage removes is
            redirected to that token's own target, so every ``dst`` is a kept token.

    Returns:
        ``[B, n_keep]`` int64 indices into ``N``, ascending, prefix first. With
        ``return_merge``: ``(kept, src [B, r], dst [B, r])``, each S-removed token ``src``
        and its most similar more-important token ``dst`` (indices into ``N``); ``r = r_S``,
        or ``r_S + r_I`` with ``merge_all`` (S pairs first).
    """
    b, h, n, _ = attn.shape
    none = torch.zeros(b, 0, dtype=torch.int64, device=attn.device)
    if n_keep == n:                                                    # keeps everything: identity
        kept = torch.arange(n, device=attn.device).unsqueeze(0).expand(b, n)
        return (kept, none, none) if return_merge else kept
    kw = dict(vmin=vmin, vmax=vmax, var_norm=var_norm, use_vhf=use_vhf)
    ninit = max(num_prefix, 1) if cls_init else 0
    kept, src, dst, mask = None, none, none, None
    feats = None
    if n_after_s < n:                                                  # I' -> S
        imp_pre = eir_vhf(wpr(attn, pre_iters, cls_init, ninit), **kw)
        feats = key_features(keys, feature)
        kept, src, dst = s_stage(feats, imp_pre, n - n_after_s, num_prefix, return_match=True)
        if n_keep == n_after_s:
            return (kept, src, dst) if return_merge else kept
        mask = 1.0 - index_mask(src, n)                                  # [B, N]: the S-stage's survivors
    imp = eir_vhf(wpr(attn, iters, cls_init, ninit, mask=mask), **kw, mask=mask)   # I-stage among them
    out = topk_keep(imp if mask is None else torch.where(mask > 0, imp, -1.0), n_keep, num_prefix)
    if not return_merge:
        return out
    if merge_all and n_keep > num_prefix:
        feats = key_features(keys, feature) if feats is None else feats
        src, dst = _merge_dropped(feats, imp, mask, out, src, dst, n_after_s - n_keep, num_prefix)
    return out, src, dst


def _merge_dropped(feats, imp, mask, out, src, dst, r_i: int, num_prefix: int):
    """``merge_all``: append the I-stage-removed tokens and their most similar kept non-prefix
    tokens to the S-stage pairs ``(src, dst)``; S targets removed by the I-stage are redirected.
    ``imp [B, N]`` is the I-stage importance, ``mask`` the S-stage's survivors (None: all).
    ``r_I · (K - P) · F`` MACs (cosine matmul)."""
    if mask is not None:                                                           # S-removed: never "least important"
        imp = torch.where(mask > 0, imp, torch.finfo(torch.float32).max)
    drop = select_lowest(order_key(imp[:, num_prefix:]), r_i) + num_prefix         # complement of topk_keep
    targets = out[:, num_prefix:]                                                  # [B, K - P]
    sim = torch.matmul(gather_tokens(feats, drop), gather_tokens(feats, targets).transpose(1, 2))
    dst_i = gather_tokens(targets, sim.argmax(dim=-1))                             # [B, r_I]
    if src.shape[1]:
        hit = dst.unsqueeze(-1) == drop.unsqueeze(1)                               # [B, r_S, r_I]
        redirect = (hit.to(torch.int64) * dst_i.unsqueeze(1)).sum(-1)
        dst = torch.where(hit.any(-1), redirect, dst)
    return torch.cat([src, drop], dim=1), torch.cat([dst, dst_i], dim=1)
