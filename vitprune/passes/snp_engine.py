"""Block-by-block neuron pruning with calibration statistics and least-squares recovery.

Shared by the ``snp`` and ``head-prune`` passes. For every block in order (ALGORITHMS.md §2b
pseudocode, extended with the zero-shot recovery of issue 4 item 5):

1. run the graph being pruned (blocks before this one already pruned: *sequential*
   reconstruction) and the original graph on the calibration images, batch by batch,
   accumulating q-k pair scores and the Gram statistics of the projection input;
2. choose kept heads, q-k pairs and value neurons; refit ``proj`` by ridge least squares so that
   the block's residual stream after attention matches the ORIGINAL model's
   (target ``T = attn_residual_orig - block_input_pruned``, which also absorbs the error
   accumulated upstream); rebuild the attention with smaller dense q/k/v;
3. the same for the MLP: choose fc1 neurons, refit ``fc2`` against
   ``mlp_residual_orig - attn_residual_pruned``.

Only statistics are kept (``[M+1, M+1]`` Grams, ``[H, d]`` score sums): memory does not
grow with the number of calibration images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.fx import GraphModule, Node

from ..calibration import grab, iter_batches
from ..ir.match import VIEW_OPS, find_attention_sites
from ..ir.sites import AttentionSite
from ..ops.lstsq import LinearStats, reconstruction_error, refit
from ..ops.snp_scores import activation_scores, qk_pair_scores, redundancy_scores, top_indices
from .snp_surgery import prune_attention, prune_mlp, qkv_head_weights, value_head_dim

aten = torch.ops.aten


@dataclass
class BlockPlan:
    """Kept widths of one block: heads (count), q/k per head, v per head, MLP hidden."""

    heads: int
    qk: int
    v: int
    mlp: Optional[int]


@dataclass
class EngineOptions:
    criterion: str = "snp"  # "snp" | "activation"
    compensate: bool = True
    sequential: bool = True
    ridge: float = 1e-3
    gamma_energy: float = 0.9
    gamma_cap: int = 16
    batch_size: int = 16
    progress: bool = False
    head_criterion: str = "qk"  # head scores: mean q-k pair score


def _direct_residual(site: AttentionSite, lin: Node, res: Node) -> bool:
    """True if ``lin``'s output reaches the residual add ``res`` only through views/dropout."""
    cur = lin
    for _ in range(8):
        users = list(cur.users)
        if len(users) != 1:
            return False
        cur = users[0]
        if cur is res:
            return True
        if cur.target not in VIEW_OPS:
            return False
    return False


def prune_blocks(gm: GraphModule, calibration: torch.Tensor, plans: list[BlockPlan], opts: EngineOptions,
                 on_block: Optional[Callable[[int], None]] = None) -> tuple[GraphModule, list[dict]]:
    """Prune every block of a copy of ``gm`` to ``plans`` (one per attention site).

    Args:
        gm: captured graph (not modified).
        calibration: ``[n, 3, H, W]`` images.
        plans: kept widths per block (``mlp=None`` keeps the MLP).
        opts: criterion, recovery and numerics.

    Returns:
        the pruned graph (cleaned, NOT re-exported: call ``finalize``) and per-block records with
        kept widths and calibration reconstruction errors (relative, before and after refit).
    """
    work = copy.deepcopy(gm)
    sites_o = find_attention_sites(gm)
    sites_w = find_attention_sites(work)
    records = []
    for li, (so, sw, plan) in enumerate(zip(sites_o, sites_w, plans)):
        rec = {"block": li}
        H, d, dv = sw.num_heads, sw.head_dim, value_head_dim(sw)
        changed_attn = (plan.heads, plan.qk, plan.v) != (H, d, dv)
        if changed_attn:
            rec.update(_prune_attention_block(gm, work, so, sw, plan, calibration, opts))
        m = sw.fc1.out_features if sw.fc1 is not None else None
        if plan.mlp is not None and m is not None and plan.mlp != m:
            work.graph.eliminate_dead_code()
            work.recompile()
            rec.update(_prune_mlp_block(gm, work, so, sw, plan, calibration, opts))
        rec.update(heads=plan.heads, qk=plan.qk, v=plan.v, mlp=plan.mlp if plan.mlp is not None else m)
        records.append(rec)
        work.graph.eliminate_dead_code()
        work.recompile()
        if on_block:
            on_block(li)
    return work, records


def _last_before(lin: Node, res: Node) -> Node:
    cur = lin
    while True:
        nxt = next(iter(cur.users))
        if nxt is res:
            return cur
        cur = nxt


def _prune_attention_block(gm, work, so, sw, plan, calibration, opts) -> dict:
    H, d, dv = sw.num_heads, sw.head_dim, value_head_dim(sw)
    proj_in_w = sw.proj.node.args[0]
    skip_w = None
    if _direct_residual(sw, sw.proj.node, sw.attn_residual):
        last = _last_before(sw.proj.node, sw.attn_residual)
        skip_w = [a for a in sw.attn_residual.args if a is not last][0]
    pair_sum = torch.zeros(H, d, dtype=torch.float64)
    stats = LinearStats.zeros(H * dv, sw.proj.out_features)
    need_qk = plan.qk < d or plan.heads < H
    for xb in iter_batches(calibration, opts.batch_size, opts.progress, f"block {sw.block_index} attention"):
        want_w = [proj_in_w] + ([sw.q, sw.k] if need_qk else []) + ([skip_w] if skip_w is not None else [])
        if opts.sequential:
            vw = grab(work, xb, want_w)
            vo = grab(gm, xb, [so.attn_residual, so.proj.node])
            q, k, x = vw.get(sw.q), vw.get(sw.k), vw[proj_in_w]
        else:
            want_o = [so.proj.node.args[0], so.attn_residual, so.proj.node] + ([so.q, so.k] if need_qk else [])
            vo = grab(gm, xb, want_o)
            vw = {skip_w: None}
            q, k, x = vo.get(so.q), vo.get(so.k), vo[so.proj.node.args[0]]
        if need_qk:
            pair_sum += qk_pair_scores(q, k, opts.gamma_energy, opts.gamma_cap).sum(0)
        if skip_w is not None and opts.sequential:
            t = vo[so.attn_residual] - vw[skip_w]
        else:
            t = vo[so.proj.node]
        stats.add(x, t)
    # --- choose heads, q-k pairs, value neurons
    hs = pair_sum.mean(-1)
    heads = top_indices(hs, plan.heads) if plan.heads < H else list(range(H))
    qk_keep = [top_indices(pair_sum[h], plan.qk) for h in heads]
    w_proj = sw.proj.weight_tensor(work).detach()
    if opts.criterion == "activation":
        vs = activation_scores(stats.gram_diag, w_proj).reshape(H, dv)
    else:
        vs = redundancy_scores(qkv_head_weights(work, sw)[2][0])
    v_keep = [top_indices(vs[h], plan.v) for h in heads]
    cols = [h * dv + i for h, keep in zip(heads, v_keep) for i in keep]
    b_proj = sw.proj.bias_tensor(work)
    w_sl = w_proj[:, cols]
    err_sliced = reconstruction_error(stats, cols, w_sl, b_proj)
    w_new = b_new = None
    err = err_sliced
    if opts.compensate:
        w_fit, b_fit = refit(stats, cols, opts.ridge)
        err_fit = reconstruction_error(stats, cols, w_fit, b_fit)
        if err_fit <= err_sliced:  # recovery never increases the calibration error
            w_new, b_new, err = w_fit, b_fit, err_fit
    prune_attention(work, sw, heads, qk_keep, v_keep, w_new, b_new)
    return {"kept_heads": heads, "attn_err_sliced": err_sliced, "attn_err": err}


def _prune_mlp_block(gm, work, so, sw, plan, calibration, opts) -> dict:
    m = sw.fc1.out_features
    fc2_in_w = sw.fc2.node.args[0]
    skip_w = None
    if sw.mlp_residual is not None and _direct_residual(sw, sw.fc2.node, sw.mlp_residual):
        last = _last_before(sw.fc2.node, sw.mlp_residual)
        skip_w = [a for a in sw.mlp_residual.args if a is not last][0]
    stats = LinearStats.zeros(m, sw.fc2.out_features)
    for xb in iter_batches(calibration, opts.batch_size, opts.progress, f"block {sw.block_index} mlp"):
        if opts.sequential:
            vw = grab(work, xb, [fc2_in_w] + ([skip_w] if skip_w is not None else []))
            x = vw[fc2_in_w]
            if skip_w is not None:
                t = grab(gm, xb, [so.mlp_residual])[so.mlp_residual] - vw[skip_w]
            else:
                t = grab(gm, xb, [so.fc2.node])[so.fc2.node]
        else:
            vo = grab(gm, xb, [so.fc2.node.args[0], so.fc2.node])
            x, t = vo[so.fc2.node.args[0]], vo[so.fc2.node]
        stats.add(x, t)
    w2 = sw.fc2.weight_tensor(work).detach()
    b2 = sw.fc2.bias_tensor(work)
    if opts.criterion == "activation":
        sc = activation_scores(stats.gram_diag, w2)
    else:
        sc = redundancy_scores(sw.fc1.weight_tensor(work).detach()[None])[0]
    keep = top_indices(sc, plan.mlp)
    err_sliced = reconstruction_error(stats, keep, w2[:, keep], b2)
    w_new = b_new = None
    err = err_sliced
    if opts.compensate:
        w_fit, b_fit = refit(stats, keep, opts.ridge)
        err_fit = reconstruction_error(stats, keep, w_fit, b_fit)
        if err_fit <= err_sliced:
            w_new, b_new, err = w_fit, b_fit, err_fit
    prune_mlp(work, sw, keep, w_new, b_new)
    return {"mlp_err_sliced": err_sliced, "mlp_err": err}
