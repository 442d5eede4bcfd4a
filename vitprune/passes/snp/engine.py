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
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.fx import GraphModule, Node

from ...calibration import grab
from ...ir.match import VIEW_OPS, find_attention_sites
from ...ir.sites import AttentionSite
from ...ir.width_repair import repair_widths
from .lstsq import LinearStats, cv_error, cv_ridge, greedy_lsq_select, reconstruction_error, refit, refit_scales
from .scores import activation_scores, qk_pair_scores, redundancy_scores, top_indices
from .surgery import prune_attention, prune_mlp, qkv_head_weights, value_head_dim

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
    criterion: str = "snp"  # "snp" | "activation" | "lsq" | "fisher"
    compensate: bool = True
    sequential: bool = True
    #: relative ridge of the refit; None: chosen per layer by two-fold cross-validation over
    #: the calibration images (:func:`vitprune.passes.snp.lstsq.cv_ridge`)
    ridge: Optional[float] = 1e-3
    #: what the refit is shrunk towards: "original" (the layer's kept weights) or "zero"
    shrink: str = "zero"
    #: "full": refit all weights of proj/fc2; "scale": one scale per kept input and the bias
    #: (Kwon et al. 2022 least-squares mask tuning)
    recovery: str = "full"
    #: per-token weights of the refit: "none", "ln" (``1 / var`` over channels of the original
    #: residual stream at that token: the error as the next LayerNorm sees it) or "fisher"
    #: (``||dL/dh_t||^2`` of the original model, from ``scores``; BRECQ-style)
    token_weight: str = "none"
    gamma_energy: float = 0.9
    gamma_cap: int = 16
    batch_size: int = 16
    progress: bool = False
    head_criterion: str = "qk"  # head scores: mean q-k pair score
    #: per-block Fisher scores (:class:`vitprune.passes.snp.sensitivity.BlockScores`), needed by
    #: ``criterion="fisher"`` (heads, q-k pairs, value and fc1 neurons chosen by Fisher information)
    scores: Optional[list] = None


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


class _Stream:
    """Per calibration batch, the residual stream entering the current block, for the original
    graph and the graph being pruned (one layer's activations: bounded by the calibration set
    itself, never one tensor per layer)."""

    def __init__(self, gm, work, calibration, batch_size, sequential):
        self.gm, self.work, self.sequential = gm, work, sequential
        self.batches = [calibration[i:i + batch_size] for i in range(0, calibration.shape[0], batch_size)]
        self.node_o = self.node_w = None
        self.h_o = [None] * len(self.batches)
        self.h_w = [None] * len(self.batches)

    def _given(self, node, h, i):
        return {node: h[i]} if node is not None and h[i] is not None else {}

    def orig(self, i, nodes):
        return grab(self.gm, self.batches[i], nodes, self._given(self.node_o, self.h_o, i))

    def pruned(self, i, nodes):
        if not self.sequential:
            raise RuntimeError("pruned activations are not used in non-sequential mode")
        return grab(self.work, self.batches[i], nodes, self._given(self.node_w, self.h_w, i))

    def advance(self, node_o, node_w):
        """Move both streams to the inputs of the next block."""
        for i in range(len(self.batches)):
            ho = self.orig(i, [node_o])[node_o]
            hw = self.pruned(i, [node_w])[node_w] if self.sequential else None
            self.h_o[i], self.h_w[i] = ho, hw
        self.node_o, self.node_w = node_o, node_w


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
    stream = _Stream(gm, work, calibration, opts.batch_size, opts.sequential)
    stream.token_weight = opts.token_weight
    records = []
    blocks = range(len(plans))
    if opts.progress:
        from tqdm import tqdm

        blocks = tqdm(blocks, desc="snp blocks", leave=False)
    for li in blocks:
        so, sw, plan = sites_o[li], sites_w[li], plans[li]
        rec = {"block": li}
        H, d, dv = sw.num_heads, sw.head_dim, value_head_dim(sw)
        m = sw.fc1.out_features if sw.fc1 is not None else None
        attn = (plan.heads, plan.qk, plan.v) != (H, d, dv)
        mlp = plan.mlp is not None and m is not None and plan.mlp != m
        if (attn or mlp) and stream.node_o is None:
            stream.advance(so.block_input, sw.block_input)
        if attn:
            rec.update(_prune_attention_block(stream, so, sw, plan, opts))
            work.graph.eliminate_dead_code()
            work.recompile()
            # readers of q/k/v outside attention (e.g. Zero-TPrune's S-stage key features)
            repair_widths(work, stream.batches[0][:1], {H * d, H * dv})
        if mlp:
            rec.update(_prune_mlp_block(stream, so, sw, plan, opts))
            work.graph.eliminate_dead_code()
            work.recompile()
        rec.update(heads=plan.heads, qk=plan.qk, v=plan.v, mlp=plan.mlp if plan.mlp is not None else m)
        records.append(rec)
        later = [i for i in range(li + 1, len(plans)) if _changes(sites_w[i], plans[i])]
        if later and stream.node_o is not None:
            stream.advance(sites_o[li + 1].block_input, sites_w[li + 1].block_input)
        if on_block:
            on_block(li)
    return work, records


def _changes(s: AttentionSite, plan: BlockPlan) -> bool:
    m = s.fc1.out_features if s.fc1 is not None else None
    return (plan.heads, plan.qk, plan.v) != (s.num_heads, s.head_dim, value_head_dim(s)) or (
        plan.mlp is not None and m is not None and plan.mlp != m)


def _last_before(lin: Node, res: Node) -> Node:
    cur = lin
    while True:
        nxt = next(iter(cur.users))
        if nxt is res:
            return cur
        cur = nxt


def _skip(site: AttentionSite, lin: Node, res: Optional[Node]) -> Optional[Node]:
    """The other operand of the residual add after ``lin`` (None if a layer scale sits between)."""
    if res is None or not _direct_residual(site, lin, res):
        return None
    last = _last_before(lin, res)
    return [a for a in res.args if a is not last][0]


def _targets(stream, i, so, sw, lin_o, lin_w, res_o, res_w, x_w, x_o, extra_w=(), extra_o=()):
    """Input ``x`` of the linear (pruned model if sequential) and its refit target ``t``:
    original residual stream minus the pruned model's skip input (sequential, no layer scale),
    else the original linear's output."""
    skip_w = _skip(sw, lin_w, res_w)
    if stream.sequential:
        vo = stream.orig(i, [res_o if skip_w is not None else lin_o, *extra_o])
        vw = stream.pruned(i, [x_w] + ([skip_w] if skip_w is not None else []) + list(extra_w))
        t = vo[res_o] - vw[skip_w] if skip_w is not None else vo[lin_o]
        if getattr(stream, "token_weight", "none") == "ln" and skip_w is not None:
            vw["_weight"] = 1.0 / vo[res_o].float().var(-1).clamp_min(1e-6)
        return vw[x_w], t, vw, vo
    vo = stream.orig(i, [x_o, lin_o, *extra_o])
    return vo[x_o], vo[lin_o], {}, vo


def _prune_attention_block(stream, so, sw, plan, opts) -> dict:
    work = stream.work
    H, d, dv = sw.num_heads, sw.head_dim, value_head_dim(sw)
    pair_sum = torch.zeros(H, d, dtype=torch.float64)
    folds = [LinearStats.zeros(H * dv, sw.proj.out_features) for _ in range(2)]
    fisher = opts.scores[sw.block_index] if opts.criterion == "fisher" else None
    need_qk = (plan.qk < d or plan.heads < H) and fisher is None
    for i in range(len(stream.batches)):
        x, t, vw, vo = _targets(stream, i, so, sw, so.proj.node, sw.proj.node, so.attn_residual, sw.attn_residual,
                                sw.proj.node.args[0], so.proj.node.args[0],
                                extra_w=[sw.q, sw.k] if need_qk and stream.sequential else (),
                                extra_o=[so.q, so.k] if need_qk and not stream.sequential else ())
        if need_qk:
            q, k = (vw[sw.q], vw[sw.k]) if stream.sequential else (vo[so.q], vo[so.k])
            pair_sum += qk_pair_scores(q, k, opts.gamma_energy, opts.gamma_cap).sum(0)
        folds[i % 2].add(x, t, _weight(stream, opts, sw, i, "attn_tokens", vw))
    stats = folds[0] + folds[1]
    # --- choose heads, q-k pairs, value neurons
    pair = fisher.qk if fisher is not None else pair_sum
    hs = fisher.head if fisher is not None else pair_sum.mean(-1)
    heads = top_indices(hs, plan.heads) if plan.heads < H else list(range(H))
    qk_keep = [top_indices(pair[h], plan.qk) for h in heads]
    w_proj = sw.proj.weight_tensor(work).detach()
    if opts.criterion == "lsq":
        sel = greedy_lsq_select(stats, [list(range(h * dv, (h + 1) * dv)) for h in heads], plan.v, _ridge(opts))
        v_keep = [[c - h * dv for c in g] for h, g in zip(heads, sel)]
    else:
        if fisher is not None:
            vs = fisher.v
        elif opts.criterion == "activation":
            vs = activation_scores(stats.gram_diag, w_proj).reshape(H, dv)
        else:
            vs = redundancy_scores(qkv_head_weights(work, sw)[2][0])
        v_keep = [top_indices(vs[h], plan.v) for h in heads]
    cols = [h * dv + i for h, keep in zip(heads, v_keep) for i in keep]
    w_new, b_new, rec = _recover(folds, cols, w_proj[:, cols], sw.proj.bias_tensor(work), opts)
    prune_attention(work, sw, heads, qk_keep, v_keep, w_new, b_new)
    return {"kept_heads": heads, **{f"attn_{k}": v for k, v in rec.items()}}


def _weight(stream, opts, sw, i, key, vw):
    """Per-token refit weights ``[B, N]`` of calibration batch ``i`` (None: unweighted)."""
    if opts.token_weight == "fisher" and stream.sequential and opts.scores is not None:
        w = getattr(opts.scores[sw.block_index], key)
        if w is not None:
            bs = stream.batches[0].shape[0]
            return w[i * bs: i * bs + stream.batches[i].shape[0]]
    return vw.get("_weight")


def _ridge(opts) -> float:
    return 1e-3 if opts.ridge is None else opts.ridge


def _recover(folds, keep, w_sliced, b, opts):
    """Least-squares recovery of the linear after the kept inputs ``keep``: ``(weight or None,
    bias or None, record)``; None when recovery is off or would increase the calibration error."""
    stats = folds[0] + folds[1]
    err_sliced = reconstruction_error(stats, keep, w_sliced, b)
    rec = {"err_sliced": err_sliced, "err": err_sliced}
    if not opts.compensate:
        return None, None, rec
    if opts.recovery == "scale":
        lam = _ridge(opts)
        w_fit, b_fit = refit_scales(stats, keep, w_sliced, lam)
    else:
        prior = w_sliced if opts.shrink == "original" else None
        lam = opts.ridge
        if lam is None:
            lam = cv_ridge(folds, keep, prior) if folds[0].count and folds[1].count else 1e-3
        w_fit, b_fit = refit(stats, keep, lam, prior)
    err_fit = reconstruction_error(stats, keep, w_fit, b_fit)
    rec["ridge"] = lam
    if opts.recovery == "full" and folds[0].count and folds[1].count:
        rec["err_cv"] = min(err_sliced, cv_error(folds, keep, prior, lam))
    if err_fit > err_sliced:  # recovery never increases the calibration error
        return None, None, rec
    rec["err"] = err_fit
    return w_fit, b_fit, rec


def _prune_mlp_block(stream, so, sw, plan, opts) -> dict:
    work = stream.work
    m = sw.fc1.out_features
    folds = [LinearStats.zeros(m, sw.fc2.out_features) for _ in range(2)]
    for i in range(len(stream.batches)):
        x, t, vw, _ = _targets(stream, i, so, sw, so.fc2.node, sw.fc2.node, so.mlp_residual, sw.mlp_residual,
                               sw.fc2.node.args[0], so.fc2.node.args[0])
        folds[i % 2].add(x, t, _weight(stream, opts, sw, i, "mlp_tokens", vw))
    stats = folds[0] + folds[1]
    w2 = sw.fc2.weight_tensor(work).detach()
    b2 = sw.fc2.bias_tensor(work)
    if opts.criterion == "lsq":
        keep = greedy_lsq_select(stats, [list(range(m))], plan.mlp, _ridge(opts))[0]
    else:
        if opts.criterion == "fisher":
            sc = opts.scores[sw.block_index].fc1
        elif opts.criterion == "activation":
            sc = activation_scores(stats.gram_diag, w2)
        else:
            sc = redundancy_scores(sw.fc1.weight_tensor(work).detach()[None])[0]
        keep = top_indices(sc, plan.mlp)
    w_new, b_new, rec = _recover(folds, keep, w2[:, keep], b2, opts)
    prune_mlp(work, sw, keep, w_new, b_new)
    return {f"mlp_{k}": v for k, v in rec.items()}
