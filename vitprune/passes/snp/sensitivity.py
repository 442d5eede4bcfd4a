"""Per-structure Fisher sensitivities of every attention block (Kwon et al. 2022 §4.1), for the
global allocation of :mod:`vitprune.passes.snp.allocation` and the ``fisher`` criterion of SNP.

Masks of ones are put (per image) on:

* the per-head queries ``q`` ``[B, H, N, d]``: masking query neuron ``n`` of head ``h`` scales
  the rank-1 logit term ``q_n k_n^T`` exactly like removing the q-k pair would zero it, so its
  mask is the q-k pair mask;
* the input of ``proj`` ``[B, N, H·d_v]``: value neuron ``(h, i)`` (``attn @ v`` is linear in
  ``v``), and, summed over the head's ``d_v`` columns before squaring, head ``h``;
* the input of ``fc2`` ``[B, N, M]``: fc1 neuron ``j``.

The loss is the cross-entropy against the original model's top-1 prediction (no labels; see
:mod:`vitprune.passes.snp.fisher`). Scores are on the ORIGINAL model, computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.fx import GraphModule

from ...ir.sites import AttentionSite
from .fisher import fisher_from_gradients, mask_gradients
from .surgery import value_head_dim


@dataclass
class BlockScores:
    """Fisher information of the mask variables of one block (float64, higher = keep):
    ``qk`` ``[H, d]`` q-k pairs, ``v`` ``[H, d_v]`` value neurons, ``head`` ``[H]``,
    ``fc1`` ``[M]`` MLP hidden neurons (None without an MLP; all four None when only the token
    weights were computed). ``attn_tokens`` / ``mlp_tokens``
    ``[n, N]``: per calibration image and token, ``||dL/dh||^2`` of the residual stream after the
    attention / the MLP, normalised to mean 1 per image (weights of a Fisher-weighted
    reconstruction, as BRECQ, Li et al. 2021, with one weight per token); None if not computed."""

    qk: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    head: Optional[torch.Tensor]
    fc1: Optional[torch.Tensor]
    attn_tokens: Optional[torch.Tensor] = None
    mlp_tokens: Optional[torch.Tensor] = None


def block_fisher_scores(gm: GraphModule, sites: Sequence[AttentionSite], images: torch.Tensor,
                        batch_size: int = 16,
                        on_batch: Optional[Callable[[], None]] = None, structures: bool = True,
                        activations: Optional[dict] = None) -> list[BlockScores]:
    """Fisher scores of every block's structures on ``images`` ``[n, 3, H, W]`` (one forward
    and backward pass per batch; only ``[H, d]``-sized sums are kept). ``on_batch``: called after
    each batch (the caller's progress). ``structures=False``: only the per-token weights
    (``attn_tokens`` / ``mlp_tokens``), without the masks (the structure fields are None).
    ``activations``: if given, filled with the unpruned graph's values at every block's
    ``attn_residual`` and ``mlp_residual`` (``{node: [n, N, C]}`` over all ``images``), which the
    forward computes anyway (:func:`vitprune.passes.snp.engine.prune_blocks` reuses them)."""
    masked = {}
    for s in sites if structures else ():
        masked[s.q] = _token_dim(s.q, s.num_tokens, default=2)
        masked[s.proj.node.args[0]] = _token_dim(s.proj.node.args[0], s.num_tokens)
        if s.fc2 is not None:
            masked[s.fc2.node.args[0]] = _token_dim(s.fc2.node.args[0], s.num_tokens)
    # per-token weights only for batch-first [B, N, D] residual streams
    probes = [n for s in sites for n in (s.attn_residual, s.mlp_residual)
              if n is not None and _token_dim(n, s.num_tokens) == 1]
    acc = [dict(qk=0.0, v=0.0, head=0.0, fc1=0.0, attn_tokens=[], mlp_tokens=[]) for _ in sites]
    for st in range(0, images.shape[0], batch_size):
        vals = {} if activations is not None else None
        g, _ = mask_gradients(gm, images[st:st + batch_size], masked, probes=probes, values=vals)
        for n, v in (vals or {}).items():  # into one [n, N, C] buffer per node (a cat at the end costs more)
            if n not in activations:
                activations[n] = v.new_empty((images.shape[0], *v.shape[1:]))
            activations[n][st:st + v.shape[0]] = v
        for a, s in zip(acc, sites):
            if structures:
                H, dv = s.num_heads, value_head_dim(s)
                gv = g[s.proj.node.args[0]].reshape(-1, H, dv)  # [B, H, d_v]
                a["qk"] = a["qk"] + fisher_from_gradients(g[s.q])  # [B, H, d]
                a["v"] = a["v"] + fisher_from_gradients(gv)
                a["head"] = a["head"] + fisher_from_gradients(gv.sum(-1))
                if s.fc2 is not None:
                    a["fc1"] = a["fc1"] + fisher_from_gradients(g[s.fc2.node.args[0]])
            if s.attn_residual in g:
                a["attn_tokens"].append(_token_weights(g[s.attn_residual]))
            if s.mlp_residual is not None and s.mlp_residual in g:
                a["mlp_tokens"].append(_token_weights(g[s.mlp_residual]))
        if on_batch is not None:
            on_batch()
    return [BlockScores(qk=a["qk"] if structures else None, v=a["v"] if structures else None,
                        head=a["head"] if structures else None,
                        fc1=a["fc1"] if structures and s.fc2 is not None else None,
                        attn_tokens=torch.cat(a["attn_tokens"]) if a["attn_tokens"] else None,
                        mlp_tokens=torch.cat(a["mlp_tokens"]) if a["mlp_tokens"] else None)
            for a, s in zip(acc, sites)]


def _token_dim(node, tokens: int, default=None):
    """The axis of ``node``'s output that holds the ``tokens`` tokens, after a batch axis
    (``[B, N, C]`` -> 1, ``[N, B, C]`` -> 0, ``[B, H, N, d]`` -> 2); None if the layout has no
    separate token axis (e.g. flattened ``[N·B, C]``)."""
    val = node.meta.get("val")
    if val is None or not hasattr(val, "shape"):
        return default
    shape = list(val.shape)
    for i, sz in enumerate(shape[:-1]):
        if isinstance(sz, int) and sz == tokens and len(shape) >= 3:
            return i
    return None


def _token_weights(g: torch.Tensor) -> torch.Tensor:
    """``[B, N, D]`` gradients -> ``[B, N]`` ``||g||^2`` per token, mean 1 per image (batch-first
    layout assumed, as timm and Hugging Face ViTs). An image whose gradients all vanish (e.g. a
    zero-initialised classifier) gets weight 1 on every token instead of 0, so a weighted refit never
    sees an all-zero Gram matrix."""
    w = (g.double() ** 2).sum(-1)
    m = w.mean(-1, keepdim=True)
    return torch.where(m > 0, w / m.clamp_min(1e-300), torch.ones_like(w))
