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

Only statistics are kept (``[M+1, M+1]`` Grams, ``[H, d]`` score sums) beside the residual streams
of the current block (per calibration row, one layer's activations), unless the caller hands in the
original graph's activations of every block (``original``: the Fisher forward's, which SNP keeps when
they fit in memory, instead of running the original graph a second time).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch.fx import GraphModule, Node

from ...ir.match import VIEW_OPS, find_attention_sites
from ...ir.sites import AttentionSite
from ...ir.values import node_values
from ...ir.width_repair import repair_widths
from .options import RecoveryOptions
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


#: q-k pair scores keep the leading singular directions holding this share of the logit energy,
#: at most ``GAMMA_CAP`` of them (:func:`vitprune.passes.snp.scores.qk_pair_scores`, §2b)
GAMMA_ENERGY, GAMMA_CAP = 0.9, 16
#: ridge of the refits that are not cross-validated (``recovery=scale``, ``criterion=lsq``) when ``ridge`` is None
DEFAULT_RIDGE = 1e-3

Criterion = Literal["snp", "activation", "lsq", "fisher"]


@dataclass(frozen=True)
class _Recipe:
    """The option choices of one engine run turned into behaviour (built once by :func:`_recipe`)."""

    opts: RecoveryOptions
    criterion: str
    batch_size: int  # calibration rows per batch: images times views
    scores: Optional[list]
    v_scores: Optional[Callable]  # (stats, w_proj, work, site) -> [H, d_v]; None: lsq selection
    fc1_scores: Optional[Callable]  # (stats, w_fc2, work, site) -> [M]; None: lsq selection
    fit: Optional[Callable]  # (folds, keep, w_sliced) -> (w, b, ridge, prior); None: no recovery
    ln_weight: bool  # per-token 1/var weights of the original residual stream
    fisher_weight: bool  # per-token Fisher weights from ``scores``


def _recipe(opts: RecoveryOptions, criterion: str, views: int, scores: Optional[list]) -> _Recipe:
    if criterion == "fisher":
        v_scores = lambda stats, w, work, s: scores[s.block_index].v  # noqa: E731
        fc1_scores = lambda stats, w, work, s: scores[s.block_index].fc1  # noqa: E731
    elif criterion == "activation":
        v_scores = lambda stats, w, work, s: activation_scores(stats.gram_diag, w).reshape(  # noqa: E731
            s.num_heads, value_head_dim(s))
        fc1_scores = lambda stats, w, work, s: activation_scores(stats.gram_diag, w)  # noqa: E731
    elif criterion == "snp":
        v_scores = lambda stats, w, work, s: redundancy_scores(qkv_head_weights(work, s)[2][0])  # noqa: E731
        fc1_scores = lambda stats, w, work, s: redundancy_scores(s.fc1.weight_tensor(work).detach()[None])[0]  # noqa: E731
    else:
        v_scores = fc1_scores = None
    fit = None
    if opts.compensate:
        fit = _fit_scales(opts) if opts.recovery == "scale" else _fit_full(opts)
    return _Recipe(opts=opts, criterion=criterion, batch_size=opts.batch_size * views, scores=scores,
                   v_scores=v_scores, fc1_scores=fc1_scores, fit=fit,
                   ln_weight=opts.token_weight == "ln",
                   fisher_weight=opts.token_weight == "fisher" and opts.sequential and scores is not None)


def _fit_scales(opts):
    lam = _ridge(opts)

    def fit(folds, keep, w_sliced):
        stats = folds[0] + folds[1]
        w, b = refit_scales(stats, keep, w_sliced, lam)
        return w, b, lam, None
    return fit


def _fit_full(opts):
    original = opts.shrink == "original"

    def fit(folds, keep, w_sliced):
        prior = w_sliced if original else None
        lam = opts.ridge
        if lam is None:
            lam = cv_ridge(folds, keep, prior) if folds[0].count and folds[1].count else DEFAULT_RIDGE
        w, b = refit(folds[0] + folds[1], keep, lam, prior)
        return w, b, lam, prior
    return fit


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
    itself, never one tensor per layer).

    Token reduction before SNP (Zero-TPrune, ToMe) picks tokens from the activations, so the
    graph being pruned would keep or merge other tokens than the original one, and the refit
    targets (original residual stream minus the pruned model's skip input) would pair rows of
    different tokens: a fit of noise that memorises the calibration images. The pruned graph
    therefore runs with the original graph's integer and boolean values (token indices, matchings,
    masks: everything a selection is made of; a few ``[B, K]`` tensors per batch) on every
    calibration batch, so both streams hold the same tokens row for row.
    """

    def __init__(self, gm, work, calibration, batch_size, sequential, known=None):
        self.gm, self.work, self.sequential = gm, work, sequential
        self.batches = [calibration[i:i + batch_size] for i in range(0, calibration.shape[0], batch_size)]
        self.node_o = self.node_w = None
        self.h_o = [None] * len(self.batches)
        self.h_w = [None] * len(self.batches)
        self._pos = {n: i for i, n in enumerate(gm.graph.nodes)}
        self._select = [n for n in gm.graph.nodes if _is_index(n)]  # original graph's token selections
        self.selected = [{} for _ in self.batches]  # per batch: node name -> the original's selection
        self._memo = [{} for _ in self.batches]  # per batch: original-graph values of the current block
        self._given_w = [{} for _ in self.batches]  # per batch: extra pruned-graph values still valid
        # original-graph values over all calibration rows computed elsewhere (the Fisher forward);
        # not with a token selection upstream, whose values would also be needed (can_take_original)
        self.known = dict(known or {}) if not self._select else {}

    def rows(self, i) -> slice:
        """The calibration rows of batch ``i`` (batches are consecutive, all but the last full)."""
        start = i * self.batches[0].shape[0]
        return slice(start, start + self.batches[i].shape[0])

    def _given(self, node, h, i):
        return {node: h[i]} if node is not None and h[i] is not None else {}

    def orig(self, i, nodes):
        memo = self._memo[i]
        memo.update({n: self.known[n][self.rows(i)] for n in nodes if n not in memo and n in self.known})
        missing = [n for n in nodes if n not in memo]
        if not missing:
            return {n: memo[n] for n in nodes}
        last = max(self._pos[n] for n in missing)
        sel = [n for n in self._select if n.name not in self.selected[i] and self._pos[n] < last]
        out = node_values(self.gm, self.batches[i], missing + sel, self._given(self.node_o, self.h_o, i))
        for n in sel:
            self.selected[i][n.name] = out[n]
        return {n: memo[n] if n in memo else out[n] for n in nodes}

    def prefetch(self, nodes):
        """Compute the original graph's ``nodes`` (of the current block) once for every batch."""
        for i in range(len(self.batches)):
            self._memo[i] = self.orig(i, nodes)

    def pruned(self, i, nodes, keep=()):
        """Values of ``nodes`` in the graph being pruned; those in ``keep`` stay given until the
        stream advances (activations the next surgery does not change)."""
        if not self.sequential:
            raise RuntimeError("pruned activations are not used in non-sequential mode")
        given = self._given(self.node_w, self.h_w, i)
        if self.selected[i]:
            by_name = {n.name: n for n in self.work.graph.nodes}
            given.update({by_name[k]: v for k, v in self.selected[i].items() if k in by_name})
        given.update(self._given_w[i])
        out = node_values(self.work, self.batches[i], nodes, given)
        self._given_w[i].update({n: out[n] for n in keep})
        return out

    def give(self, i, node, value):
        """``value`` of the pruned graph's ``node`` on batch ``i``, valid until the stream advances."""
        self._given_w[i][node] = value

    def advance(self, node_o, node_w):
        """Move both streams to the inputs of the next block."""
        for i in range(len(self.batches)):
            ho = self.orig(i, [node_o])[node_o]
            hw = self.pruned(i, [node_w])[node_w] if self.sequential else None
            self.h_o[i], self.h_w[i] = ho, hw
            self._memo[i], self._given_w[i] = {}, {}
        self.node_o, self.node_w = node_o, node_w


def can_take_original(gm: GraphModule) -> bool:
    """True if :func:`prune_blocks` uses ``original`` values for ``gm``: no integer or boolean
    values are computed in it (a token selection's, which the pruned graph would need as well)."""
    return not any(_is_index(n) for n in gm.graph.nodes)


def _is_index(node: Node) -> bool:
    """True for a computed integer or boolean tensor (indices, masks)."""
    val = node.meta.get("val")
    return (node.op == "call_function" and isinstance(val, torch.Tensor) and not val.dtype.is_floating_point
            and not val.dtype.is_complex)


def prune_blocks(gm: GraphModule, calibration: torch.Tensor, plans: list[BlockPlan], opts: RecoveryOptions,
                 criterion: Criterion = "activation", views: int = 1, scores: Optional[list] = None,
                 on_block: Optional[Callable[[int], None]] = None,
                 original: Optional[dict] = None) -> tuple[GraphModule, list[dict]]:
    """Prune every block of a copy of ``gm`` to ``plans`` (one per attention site).

    Args:
        gm: captured graph (not modified).
        calibration: ``[n * views, 3, H, W]`` images, ``views`` per image grouped by
            :func:`vitprune.calibration.augment_views` (a batch holds ``opts.batch_size`` images
            with all their views, so the refit's two folds split images, not views of one image).
        plans: kept widths per block (``mlp=None`` keeps the MLP).
        opts: calibration and recovery options.
        criterion: which v/fc1 neurons go (see :class:`vitprune.passes.snp.snp.SNP`); q-k pairs
            and heads go by their pair scores (or, with ``fisher``, by ``scores``).
        scores: per-block Fisher scores (:class:`vitprune.passes.snp.sensitivity.BlockScores`),
            needed by ``criterion="fisher"`` and used by ``token_weight="fisher"``.
        on_block: called with the block index after each block (progress).
        original: ``{node of gm: [n * views, ...]}`` values of ``gm`` on ``calibration`` already
            computed (e.g. by the Fisher forward: ``block_fisher_scores(activations=...)``), used
            instead of running the original graph for those nodes; must come from the same rows.

    Returns:
        the pruned graph (cleaned, NOT re-exported: call ``finalize``) and per-block records with
        kept widths and calibration reconstruction errors (relative, before and after refit).
    """
    recipe = _recipe(opts, criterion, views, scores)
    work = copy.deepcopy(gm)
    sites_o = find_attention_sites(gm)
    sites_w = find_attention_sites(work)
    stream = _Stream(gm, work, calibration, recipe.batch_size, opts.sequential, original)
    records = []
    for li in range(len(plans)):
        so, sw, plan = sites_o[li], sites_w[li], plans[li]
        rec = {"block": li}
        H, d, dv = sw.num_heads, sw.head_dim, value_head_dim(sw)
        m = sw.fc1.out_features if sw.fc1 is not None else None
        attn = (plan.heads, plan.qk, plan.v) != (H, d, dv)
        mlp = plan.mlp is not None and m is not None and plan.mlp != m
        if (attn or mlp) and stream.node_o is None:
            stream.advance(so.block_input, sw.block_input)
        if (attn or mlp) and opts.sequential:  # the original block, computed once
            stream.prefetch(_orig_needs(so, sw, attn, mlp, sites_o[li + 1].block_input if li + 1 < len(plans) else None))
        if attn:
            rec.update(_prune_attention_block(stream, so, sw, plan, recipe))
            work.graph.eliminate_dead_code()
            work.recompile()
            # readers of q/k/v outside attention (e.g. Zero-TPrune's S-stage key features)
            repair_widths(work, stream.batches[0][:1], {H * d, H * dv})
        if mlp:
            rec.update(_prune_mlp_block(stream, so, sw, plan, recipe))
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


def _orig_needs(so, sw, attn: bool, mlp: bool, next_input) -> list:
    """The original graph's values that a sequential block reads: the refit targets
    (:func:`_targets`) and the next block's input."""
    out = []
    if attn:
        out.append(so.attn_residual if _skip(sw, sw.proj.node, sw.attn_residual) is not None else so.proj.node)
    if mlp:
        out.append(so.mlp_residual if _skip(sw, sw.fc2.node, sw.mlp_residual) is not None else so.fc2.node)
    return out + ([next_input] if next_input is not None else [])


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


def _targets(stream, recipe, i, so, sw, lin_o, lin_w, res_o, res_w, x_w, x_o, extra_w=(), extra_o=(),
             keep_skip=False):
    """Input ``x`` of the linear (pruned model if sequential) and its refit target ``t``:
    original residual stream minus the pruned model's skip input (sequential, no layer scale),
    else the original linear's output. ``keep_skip``: the skip input stays valid until the
    stream advances (the MLP's skip input is upstream of its surgery)."""
    skip_w = _skip(sw, lin_w, res_w)
    if stream.sequential:
        vo = stream.orig(i, [res_o if skip_w is not None else lin_o, *extra_o])
        vw = stream.pruned(i, [x_w] + ([skip_w] if skip_w is not None else []) + list(extra_w),
                           keep=[skip_w] if keep_skip and skip_w is not None else ())
        t = vo[res_o] - vw[skip_w] if skip_w is not None else vo[lin_o]
        if recipe.ln_weight and skip_w is not None:
            vw["_weight"] = 1.0 / vo[res_o].float().var(-1).clamp_min(1e-6)
        return vw[x_w], t, vw, vo
    vo = stream.orig(i, [x_o, lin_o, *extra_o])
    return vo[x_o], vo[lin_o], {}, vo


def _prune_attention_block(stream, so, sw, plan, recipe: _Recipe) -> dict:
    work = stream.work
    H, d, dv = sw.num_heads, sw.head_dim, value_head_dim(sw)
    pair_sum = torch.zeros(H, d, dtype=torch.float64)
    folds = [LinearStats.zeros(H * dv, sw.proj.out_features) for _ in range(2)]
    fisher = recipe.scores[sw.block_index] if recipe.criterion == "fisher" else None
    need_qk = (plan.qk < d or plan.heads < H) and fisher is None
    for i in range(len(stream.batches)):
        x, t, vw, vo = _targets(stream, recipe, i, so, sw, so.proj.node, sw.proj.node, so.attn_residual,
                                sw.attn_residual, sw.proj.node.args[0], so.proj.node.args[0],
                                extra_w=[sw.q, sw.k] if need_qk and stream.sequential else (),
                                extra_o=[so.q, so.k] if need_qk and not stream.sequential else ())
        if need_qk:
            q, k = (vw[sw.q], vw[sw.k]) if stream.sequential else (vo[so.q], vo[so.k])
            pair_sum += qk_pair_scores(q, k, GAMMA_ENERGY, GAMMA_CAP).sum(0)
        folds[i % 2].add(x, t, _weight(stream, recipe, sw, i, "attn_tokens", vw))
    stats = folds[0] + folds[1]
    # --- choose heads (mean q-k pair score, §2b "Head pruning"), q-k pairs, value neurons
    pair = fisher.qk if fisher is not None else pair_sum
    hs = fisher.head if fisher is not None else pair_sum.mean(-1)
    heads = top_indices(hs, plan.heads) if plan.heads < H else list(range(H))
    qk_keep = [top_indices(pair[h], plan.qk) for h in heads]
    w_proj = sw.proj.weight_tensor(work).detach()
    if recipe.v_scores is None:
        sel = greedy_lsq_select(stats, [list(range(h * dv, (h + 1) * dv)) for h in heads], plan.v,
                                _ridge(recipe.opts))
        v_keep = [[c - h * dv for c in g] for h, g in zip(heads, sel)]
    else:
        vs = recipe.v_scores(stats, w_proj, work, sw)
        v_keep = [top_indices(vs[h], plan.v) for h in heads]
    cols = [h * dv + i for h, keep in zip(heads, v_keep) for i in keep]
    w_new, b_new, rec = _recover(folds, cols, w_proj[:, cols], sw.proj.bias_tensor(work), recipe)
    prune_attention(work, sw, heads, qk_keep, v_keep, w_new, b_new)
    return {"kept_heads": heads, **{f"attn_{k}": v for k, v in rec.items()}}


def _weight(stream, recipe, sw, i, key, vw):
    """Per-token refit weights ``[B, N]`` of calibration batch ``i`` (None: unweighted)."""
    if recipe.fisher_weight:
        w = getattr(recipe.scores[sw.block_index], key)
        if w is not None:
            return w[stream.rows(i)]
    return vw.get("_weight")


def _ridge(opts) -> float:
    return DEFAULT_RIDGE if opts.ridge is None else opts.ridge


def _recover(folds, keep, w_sliced, b, recipe):
    """Least-squares recovery of the linear after the kept inputs ``keep``: ``(weight or None,
    bias or None, record)``; None when recovery is off or would increase the calibration error."""
    stats = folds[0] + folds[1]
    err_sliced = reconstruction_error(stats, keep, w_sliced, b)
    rec = {"err_sliced": err_sliced, "err": err_sliced}
    if recipe.fit is None:
        return None, None, rec
    w_fit, b_fit, lam, prior = recipe.fit(folds, keep, w_sliced)
    err_fit = reconstruction_error(stats, keep, w_fit, b_fit)
    rec["ridge"] = lam
    if recipe.opts.recovery == "full" and folds[0].count and folds[1].count:
        rec["err_cv"] = min(err_sliced, cv_error(folds, keep, prior, lam))
    if err_fit > err_sliced:  # recovery never increases the calibration error
        return None, None, rec
    rec["err"] = err_fit
    return w_fit, b_fit, rec


def _prune_mlp_block(stream, so, sw, plan, recipe: _Recipe) -> dict:
    work = stream.work
    m = sw.fc1.out_features
    folds = [LinearStats.zeros(m, sw.fc2.out_features) for _ in range(2)]
    inputs = []
    for i in range(len(stream.batches)):
        x, t, vw, _ = _targets(stream, recipe, i, so, sw, so.fc2.node, sw.fc2.node, so.mlp_residual,
                               sw.mlp_residual, sw.fc2.node.args[0], so.fc2.node.args[0], keep_skip=True)
        folds[i % 2].add(x, t, _weight(stream, recipe, sw, i, "mlp_tokens", vw))
        if stream.sequential:
            inputs.append(x)
    stats = folds[0] + folds[1]
    w2 = sw.fc2.weight_tensor(work).detach()
    b2 = sw.fc2.bias_tensor(work)
    if recipe.fc1_scores is None:
        keep = greedy_lsq_select(stats, [list(range(m))], plan.mlp, _ridge(recipe.opts))[0]
    else:
        keep = top_indices(recipe.fc1_scores(stats, w2, work, sw), plan.mlp)
    w_new, b_new, rec = _recover(folds, keep, w2[:, keep], b2, recipe)
    prune_mlp(work, sw, keep, w_new, b_new)
    if stream.sequential:  # fc1 lost rows only: its kept outputs are the pruned graph's new fc2 input
        idx = torch.as_tensor(keep, dtype=torch.long)
        for i, x in enumerate(inputs):
            stream.give(i, sw.fc2.node.args[0], x.index_select(-1, idx))
    return {f"mlp_{k}": v for k, v in rec.items()}
