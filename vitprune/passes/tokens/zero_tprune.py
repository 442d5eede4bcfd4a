"""Zero-TPrune: fine-tuning-free token pruning as a graph pass (ALGORITHMS.md §1).

A *pruning layer* sits after the output (MLP residual add) of a chosen block. It scores the
block's tokens with Weighted PageRank over that block's attention probabilities (I-stage),
removes near-duplicates among the less important half with key cosine similarity
(S-stage, fed by a one-iteration I′ pre-ranking) and keeps the rest by importance. Prefix
tokens (CLS, distillation token) are always kept. Token counts are static per layer, so the
rewritten graph has one shape per layer at any batch size and exports to torch.export,
ONNX and TVM.

Schedule
    ``prune_blocks`` (0-based block indices; the layer sits after that block's output) with
    ``keep`` (keep rate per pruning layer, relative to the current *non-prefix* tokens:
    ``M' = round(keep · M)``) or ``counts`` (tokens removed per layer); or ``target_gmacs``
    (a uniform keep rate over ``prune_blocks`` solved for the budget, ±1 %); or ``preset``
    ``"a" | "b" | "c"`` (the paper's DeiT-S budgets 2.97 / 2.50 / 3.97 GMACs, applied to any
    model as the same fraction of its dense GMACs; pruning layers after blocks 3/6/9 of 12 unless
    ``prune_blocks`` is given, fewer layers than the default 3/5/7/9 because the presets are the
    paper's throughput configurations, see :func:`default_prune_blocks`). Within a layer the removed tokens split
    into ``r_S = round(rs_ratio · r)`` (S-stage, clamped to the less important half) and
    ``r_I = r - r_S``.

Counting
    GMACs include the pruning layers' own work: the explicit attention (same MACs as the
    fused kernel it replaces), every WPR iteration (``T·H·N²``) and the S-stage cosine matmul
    (``|A|·|B|·C``) are matmuls that ``FlopCounterMode`` counts; :meth:`ZeroTPrune.plan`
    gives the same number analytically. Ranks, top-k, sorts and gathers are not MACs.

Kept indices (for kept-token maps)
    Each pruning layer's selection subgraph is tagged with
    :func:`vitprune.ir.tags.tag_token_select` (``kind="prune"``: the kept indices; merge-variant
    layers that merge something: ``kind="merge"``, the packed ``kept | src | dst`` of
    :func:`vitprune.ops.merge.pack_selection`, so kept-token maps colour merged patches;
    export copies ``custom`` metadata to every ATen node it traces from the tagged node).
    :func:`kept_token_indices` runs a pruned GraphModule (or a ``CompiledModule``) on images
    and returns, per pruning layer, the kept token indices in the *original* token sequence
    (``[B, K_l]``, prefix tokens first, ascending). With ``record_indices=True`` the pass also
    records the kept indices of the example inputs in the report. (Agreed interface for ``vitprune viz``.)

Config knobs beyond the schedule: ``iters`` (WPR iterations for pruning layers after the
first three blocks / the middle / the last three blocks, default 30/5/1; ``layer_iters``
overrides per layer), VHF band ``vmin``/``vmax`` with ``var_norm`` and ``vhf`` on/off,
``cls_init``, ``importance`` (``"wpr"`` = Zero-TPrune, ``"cls"`` = CLS-attention top-k,
``"random"`` = fixed-seed random dropping), ``feature`` (S-stage keys ``"concat"``/``"mean"``),
``mode``, ``merge_all``.

Merge variant (``mode="merge"``, the default; ``mode="prune"`` is the paper's dropping)
    Instead of dropping the tokens a layer removes, each is merged into its most similar
    token by a size-weighted average (one-hot matmul, no scatter): an S-stage-removed token
    into its most similar more-important token (the S-stage's own match), an I-stage-removed
    token into its most similar kept patch token (cosine of the same key features as the
    S-stage; an S-stage target that the I-stage removes hands its sources on to its own
    target). No token is dropped. Token sizes ``[B, N, 1]`` are carried as graph values from
    the first merging layer on, and every later block gets proportional attention
    (``+log(size)`` on the attention logits before softmax, as in ToMe). Counting adds
    ``N·r_S·(C+1)`` MACs per layer for the S merge matmuls, and ``r_I·(K-P)·F`` (cosine) plus
    ``N·r_I·(C+1)`` (merge) for the I-stage's. Not in the paper (ALGORITHMS.md §1b Step 4:
    the paper drops). ``merge_all=False`` merges the S-stage pairs only and drops the
    I-stage's tokens (the earlier default); ``merge_all`` has no effect
    with ``mode="prune"``. With ``importance="cls"|"random"`` (the baselines) there is no
    S-stage and ``merge_all`` does not apply: nothing is merged, they stay pure pruning in
    either mode.

How the defaults were chosen, with the numbers: docs/decisions.md ("Zero-TPrune").
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch.fx import GraphModule, Node

from ...errors import InvalidPassConfigError
from ...ir.attention import make_explicit
from ...ir.cost import BlockDims, ViTDims, bisect_budget
from ...ir.match import find_attention_sites
from ...ir.rewrite import copy_source_meta
from ...ir.sites import AttentionSite
from ...ir.tags import decode_selection, tag_token_select, token_select_outputs
from ...ir.values import node_values
from ...ops.similarity import partition_sizes, s_stage_macs
from ...ops.token_select import gather_tokens
from ...ops.merge import mark, merge_tokens, pack_selection, packed_kept
from ...ops.wpr import wpr_macs
from ...ops.zero_tprune_layer import cls_keep, random_keep, select_tokens
from ..base import Pass, PassContext, register_pass
from .skeleton import TokenRewrite, require_unreduced_tokens

#: the paper's DeiT-S budgets (Zero-TP-a/b/c, GMACs) over our dense DeiT-S count (4.5989 GMACs);
#: a preset applies the same fraction of the dense GMACs to any model.
DEIT_S_DENSE_GMACS = 4.598882304
PRESETS = {"a": 2.97, "b": 2.50, "c": 3.97}


@dataclass
class LayerPlan:
    """What one pruning layer does: tokens in, after the S-stage, out (prefix included)."""

    block: int
    n_in: int
    n_after_s: int
    n_out: int
    iters: int

    @property
    def r_s(self) -> int:
        return self.n_in - self.n_after_s

    @property
    def r_i(self) -> int:
        return self.n_after_s - self.n_out


@register_pass("zero-tprune")
@dataclass
class ZeroTPrune(Pass):
    """Zero-TPrune token pruning (see the module docstring for every option).

    Raises (before any graph is touched):
        InvalidPassConfigError: keep rate outside (0, 1], negative counts, no or several
            schedule sources, unknown mode / preset / importance / var_norm / feature, bad
            VHF band or rs_ratio; once the model is known (still before editing): a block
            index outside ``0..depth-2``, more tokens removed than a layer has, a
            budget outside what the schedule can reach, or tokens an earlier token pass
            already reduced (token passes do not stack; SNP composes in either order).
    """

    prune_blocks: Optional[list[int]] = None
    keep: Optional[list[float]] = None
    counts: Optional[list[int]] = None
    target_gmacs: Optional[float] = None
    preset: Optional[Literal["a", "b", "c"]] = None
    rs_ratio: float = 0.7
    iters: list[int] = field(default_factory=lambda: [30, 5, 1])
    layer_iters: Optional[list[int]] = None
    vhf: bool = True
    vmin: float = 0.01
    vmax: float = 0.7
    var_norm: Literal["mean1", "sum_sq_dev", "raw"] = "mean1"
    cls_init: bool = True
    importance: Literal["wpr", "cls", "random"] = "wpr"
    mode: Literal["prune", "merge"] = "merge"
    feature: Literal["concat", "mean"] = "concat"
    merge_all: bool = True
    seed: int = 0
    record_indices: bool = False

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(msg):
            raise InvalidPassConfigError(f"zero-tprune: {msg}")

        super().validate()                                   # the Literal choices
        sources = [n for n, v in (("keep", self.keep), ("counts", self.counts), ("target_gmacs", self.target_gmacs),
                                  ("preset", self.preset)) if v is not None]
        if not sources:
            bad("no schedule: give keep=[...] or counts=[...] (with prune_blocks), target_gmacs=..., or preset=a|b|c")
        if len(sources) > 1:
            bad(f"give exactly one schedule source, got {', '.join(sources)}")
        if self.prune_blocks is not None:
            pb = self.prune_blocks
            if not pb or any(not isinstance(b, int) or isinstance(b, bool) or b < 0 for b in pb):
                bad(f"prune_blocks={pb} must be a non-empty list of block indices >= 0")
            if list(pb) != sorted(set(pb)):
                bad(f"prune_blocks={pb} must be strictly increasing")
        n_layers = len(self.prune_blocks) if self.prune_blocks is not None else None
        if self.keep is not None:
            for k in self.keep:
                if isinstance(k, bool) or not isinstance(k, (int, float)) or not (0.0 < float(k) <= 1.0):
                    bad(f"keep rate {k!r} outside (0, 1]")
            self._check_len("keep", self.keep, n_layers, bad)
        if self.counts is not None:
            for c in self.counts:
                if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                    bad(f"token count {c!r} must be an int >= 0")
            self._check_len("counts", self.counts, n_layers, bad)
        if self.target_gmacs is not None and not (isinstance(self.target_gmacs, (int, float)) and self.target_gmacs > 0):
            bad(f"target_gmacs={self.target_gmacs!r} must be > 0")
        if not (0.0 <= float(self.rs_ratio) <= 1.0):
            bad(f"rs_ratio={self.rs_ratio} outside [0, 1]")
        if not (0.0 <= self.vmin <= self.vmax):
            bad(f"VHF band [vmin={self.vmin}, vmax={self.vmax}] must satisfy 0 <= vmin <= vmax")
        if len(self.iters) != 3 or any(not isinstance(t, int) or t < 1 for t in self.iters):
            bad(f"iters={self.iters} must be 3 ints >= 1 (first three blocks / middle / last three blocks)")
        if self.layer_iters is not None:
            if any(not isinstance(t, int) or t < 1 for t in self.layer_iters):
                bad(f"layer_iters={self.layer_iters} must be ints >= 1")
            self._check_len("layer_iters", self.layer_iters, n_layers, bad, allow_one=False)

    @staticmethod
    def _check_len(name, values, n_layers, bad, allow_one=True):
        if not values:
            bad(f"{name} must not be empty")
        if n_layers is not None and len(values) != n_layers and not (allow_one and len(values) == 1):
            bad(f"{name} has {len(values)} entries but prune_blocks has {n_layers}")

    # ------------------------------------------------------------------ planning
    def _blocks(self, info: ViTDims) -> list[int]:
        if self.prune_blocks is not None:
            blocks = list(self.prune_blocks)
        elif self.keep is not None or self.counts is not None:
            vals = self.keep if self.keep is not None else self.counts
            blocks = default_prune_blocks(info.depth, len(vals) if len(vals) > 1 else None)
            if len(vals) > 1 and len(blocks) != len(vals):
                raise InvalidPassConfigError(
                    f"zero-tprune: {len(vals)} per-layer values do not fit {info.depth} blocks without "
                    f"prune_blocks; give prune_blocks (0..{info.depth - 2}) explicitly")
        else:                                              # presets: three layers, the throughput headline
            blocks = default_prune_blocks(info.depth, 3 if self.preset is not None else None)
        bad = [b for b in blocks if b > info.depth - 2]
        if bad:
            raise InvalidPassConfigError(
                f"zero-tprune: prune_blocks {bad} outside the model: a pruning layer sits after block 0.."
                f"{info.depth - 2} of this {info.depth}-block model (after the last block it would remove nothing)"
            )
        return blocks

    def _iters_for(self, block: int, i: int, depth: int) -> int:
        if self.layer_iters is not None:
            return self.layer_iters[i]
        if block < 3:
            return self.iters[0]
        if block >= depth - 3:
            return self.iters[2]
        return self.iters[1]

    def _layers(self, info: ViTDims, blocks: list[int], removed: list[int]) -> list[LayerPlan]:
        n, p = info.tokens, info.prefix
        plans = []
        for i, (b, r) in enumerate(zip(blocks, removed)):
            m = n - p
            if r > m - 1:
                raise InvalidPassConfigError(
                    f"zero-tprune: layer after block {b} removes {r} tokens but has {m} non-prefix tokens; "
                    f"valid range 0..{m - 1} (at least one patch token must stay)"
                )
            r_s = 0
            if self.importance == "wpr" and r > 0:
                r_s = min(int(round(self.rs_ratio * r)), partition_sizes(n, p)[1])
            plans.append(LayerPlan(block=b, n_in=n, n_after_s=n - r_s, n_out=n - r, iters=self._iters_for(b, i, info.depth)))
            n -= r
        return plans

    def _layers_from_keep(self, info: ViTDims, blocks: list[int], keep: list[float],
                          clamp: bool = False) -> list[LayerPlan]:
        keep = keep * len(blocks) if len(keep) == 1 else keep
        m, removed = info.tokens - info.prefix, []
        for k in keep:
            m_new = int(round(float(k) * m))
            if clamp:
                m_new = max(1, m_new)
            if m_new < 1:
                raise InvalidPassConfigError(
                    f"zero-tprune: keep rate {k} leaves no patch token of {m} at block {blocks[len(removed)]}; "
                    f"use a rate >= {0.5 / m:.4f}"
                )
            removed.append(m - m_new)
            m = m_new
        return self._layers(info, blocks, removed)

    def analytic_gmacs(self, info: ViTDims, plans: list[LayerPlan]) -> float:
        """GMACs per image of the pruned model, pruning-layer work included."""
        extra = 0
        total = info.dense_gmacs * 1e9
        delta = sum(info.block_macs(info.tokens, i) - info.block_macs(n, i)
                    for i, n in enumerate(tokens_per_block(info, plans)))
        for lp in plans:
            if lp.n_out == lp.n_in or self.importance != "wpr":
                continue
            b = info.dims(lp.block)
            if lp.r_s > 0:
                extra += wpr_macs(b.heads, lp.n_in, 1)
                if self.mode == "merge":                          # one-hot merge matmuls (x and size)
                    extra += lp.n_in * lp.r_s * (info.embed_dim + 1)
                extra += s_stage_macs(lp.n_in, info.prefix, self._fdim(b))
            if lp.r_i > 0:
                extra += wpr_macs(b.heads, lp.n_in, lp.iters, masked=lp.r_s > 0)   # masked to the S-stage's survivors
                if self._merges_dropped():                        # I-removed -> kept cosine, merge matmuls
                    extra += lp.r_i * (lp.n_out - info.prefix) * self._fdim(b)
                    extra += lp.n_in * lp.r_i * (info.embed_dim + 1)
        return (total - delta + extra) / 1e9

    def _fdim(self, b: BlockDims) -> int:
        return b.heads * b.qk if self.feature == "concat" else b.qk

    def _merges_dropped(self) -> bool:
        """``merge_all``: the I-stage's removed tokens are merged too."""
        return self.merge_all and self._merges()

    def _target(self, info: ViTDims) -> float:
        if self.preset is not None:
            return PRESETS[self.preset] / DEIT_S_DENSE_GMACS * info.dense_gmacs
        return float(self.target_gmacs)

    def plan(self, gm: GraphModule, sites: Optional[list[AttentionSite]] = None,
             info: Optional[ViTDims] = None) -> tuple[list[LayerPlan], float]:
        """The per-layer token counts this config gives on ``gm`` and their analytic GMACs.

        Raises:
            InvalidPassConfigError: the schedule does not fit the model (see the class doc), or an
                earlier token pass already reduced its tokens (:func:`require_unreduced_tokens`).
        """
        sites = sites if sites is not None else find_attention_sites(gm)
        require_unreduced_tokens("zero-tprune", gm, sites)
        info = info or ViTDims.from_graph(gm, sites)
        blocks = self._blocks(info)
        if self.keep is not None:
            plans = self._layers_from_keep(info, blocks, list(self.keep))
        elif self.counts is not None:
            counts = list(self.counts) * len(blocks) if len(self.counts) == 1 else list(self.counts)
            plans = self._layers(info, blocks, counts)
        else:
            plans = self._solve(info, blocks, self._target(info))
        return plans, self.analytic_gmacs(info, plans)

    def reachable_gmacs(self, gm: GraphModule, sites: Optional[list[AttentionSite]] = None,
                        info: Optional[ViTDims] = None) -> tuple[float, float]:
        """``(lowest, highest)`` analytic GMACs per image that a uniform keep rate over this config's
        pruning blocks reaches on ``gm``: one patch token kept at each layer, and every token kept.
        A ``target_gmacs`` below ``lowest · 0.99`` is refused by :meth:`plan`.

        Raises:
            InvalidPassConfigError: a pruning block outside the model.
        """
        info = info or ViTDims.from_graph(gm, sites)
        blocks = self._blocks(info)
        g = self._uniform_gmacs(info, blocks)
        return g(self._k_min(info)), g(1.0)

    def _uniform_gmacs(self, info: ViTDims, blocks: list[int]):
        return lambda k: self.analytic_gmacs(info, self._layers_from_keep(info, blocks, [k], clamp=True))

    @staticmethod
    def _k_min(info: ViTDims) -> float:
        """The lowest keep rate that still rounds to one patch token."""
        return 0.5 / (info.tokens - info.prefix) + 1e-9

    def _solve(self, info: ViTDims, blocks: list[int], target: float) -> list[LayerPlan]:
        """Uniform keep rate over ``blocks`` whose analytic GMACs hit ``target`` within 1 %."""
        g = self._uniform_gmacs(info, blocks)
        k_min = self._k_min(info)
        lo_g, hi_g = g(k_min), g(1.0)
        if target < lo_g * 0.99:
            raise InvalidPassConfigError(
                f"zero-tprune: budget {target:.4f} GMACs is below what pruning after blocks {blocks} can reach "
                f"(minimum {lo_g:.4f} GMACs; dense {info.dense_gmacs:.4f}); valid range [{lo_g:.4f}, {info.dense_gmacs:.4f}]"
            )
        if target > info.dense_gmacs * 1.01:
            raise InvalidPassConfigError(
                f"zero-tprune: budget {target:.4f} GMACs is above the dense model's {info.dense_gmacs:.4f}; "
                f"valid range [{lo_g:.4f}, {info.dense_gmacs:.4f}]"
            )
        if target >= hi_g:
            return self._layers_from_keep(info, blocks, [1.0])
        lo, hi = bisect_budget(g, k_min, 1.0, target, iters=60, increasing=True)
        best = min((lo, hi), key=lambda k: abs(g(k) - target))
        if abs(g(best) - target) > 0.01 * target:
            raise InvalidPassConfigError(
                f"zero-tprune: cannot hit {target:.4f} GMACs within 1 % with a uniform keep rate over blocks "
                f"{blocks} (nearest {g(best):.4f}); give more prune_blocks"
            )
        return self._layers_from_keep(info, blocks, [best], clamp=True)

    # ------------------------------------------------------------------ rewrite
    def rewrite(self, gm: GraphModule, ctx: PassContext) -> GraphModule:
        sites = find_attention_sites(gm)
        image_shape = tuple(ctx.example_inputs[0].shape[1:])
        info = ViTDims.from_graph(gm, sites, image_shape)
        plans, analytic = self.plan(gm, sites, info)           # all checks happen here, before editing
        layer_at = {lp.block: lp for lp in plans}
        rw = TokenRewrite(gm, info.tokens)
        for site in sites:
            lp = layer_at.get(site.block_index)
            # pruning layers read the probabilities: explicit there, fused SDPA elsewhere
            rw.enter_block(site, keep_fused=lp is None or self.importance == "random")
            if lp is not None:
                self._insert_layer(rw, site, lp, info.prefix)
        gm = rw.finish(ctx.example_inputs)
        rec = dict(
            prune_blocks=[lp.block for lp in plans],
            tokens_per_layer=[lp.n_out for lp in plans],
            tokens_per_block=tokens_per_block(info, plans),
            r_s=[lp.r_s for lp in plans], r_i=[lp.r_i for lp in plans], iters=[lp.iters for lp in plans],
            gmacs_dense=round(info.dense_gmacs, 6), gmacs_analytic=round(analytic, 6),
            gmacs_includes="explicit attention, WPR iterations and S-stage similarity of the pruning layers",
        )
        if self.target_gmacs is not None or self.preset is not None:
            rec["gmacs_target"] = round(self._target(info), 6)
        if self.record_indices:
            rec["kept_indices"] = [t.tolist() for t in kept_token_indices(gm, ctx.example_inputs[0])]
        ctx.record(**rec)
        return gm

    def _merges(self) -> bool:
        """Removed tokens are merged (``mode=merge``; ``cls``/``random`` have no S-stage pairs)."""
        return self.mode == "merge" and self.importance == "wpr"

    def _insert_layer(self, rw: TokenRewrite, site: AttentionSite, lp: LayerPlan, prefix: int) -> None:
        """Insert one pruning layer after ``site``'s block output: the selection, then either the
        merge and gather (merge variant) or the gather of the kept tokens."""
        g, out = rw.graph, site.block_output
        with g.inserting_after(out):
            sel = self._selection(rw, site, lp, prefix)
        if self._merges() and lp.n_out != lp.n_in:
            new_x, idx, tagged, extra, own = self._merge_and_gather(rw, sel, out, lp)
        else:
            idx = sel
            with g.inserting_after(idx):
                new_x = g.call_function(gather_tokens, (out, idx))
            extra, own, tagged = [], [sel], False
            if rw.size is not None:                              # merge mode, layer that keeps all
                with g.inserting_after(new_x):
                    rw.size = g.call_function(gather_tokens, (rw.size, idx))
                extra.append(rw.size)
        own.append(new_x)
        if not tagged:
            tag_token_select(idx, block=lp.block, kind="prune", tokens_in=lp.n_in)
        for node in [sel, idx, new_x, *extra]:
            copy_source_meta(node, out)
        rw.replace(out, new_x, own)

    def _selection(self, rw: TokenRewrite, site: AttentionSite, lp: LayerPlan, prefix: int) -> Node:
        """The node choosing the layer's tokens: kept indices ``[B, K]``, or ``(kept, src, dst)`` in
        the merge variant (:func:`~vitprune.ops.zero_tprune_layer.select_tokens`; the ``cls`` and
        ``random`` baselines: :func:`~vitprune.ops.zero_tprune_layer.cls_keep`, ``random_keep``)."""
        g, out = rw.graph, site.block_output
        if lp.n_out == lp.n_in:                                  # removes nothing: identity gather only
            return g.call_function(all_indices, (out,))
        if self.importance == "random":                          # needs no attention probabilities
            return g.call_function(random_keep, (out,), dict(n_keep=lp.n_out, num_prefix=prefix,
                                                              seed=self.seed + lp.block))
        probs = make_explicit(rw.gm, site)
        if self.importance == "cls":
            return g.call_function(cls_keep, (probs,), dict(n_keep=lp.n_out, num_prefix=prefix))
        return g.call_function(select_tokens, (probs, site.k), dict(
            n_after_s=lp.n_after_s, n_keep=lp.n_out, num_prefix=prefix, iters=lp.iters,
            cls_init=self.cls_init, vmin=float(self.vmin), vmax=float(self.vmax), var_norm=self.var_norm,
            use_vhf=self.vhf, feature=self.feature, return_merge=self._merges(), merge_all=self._merges_dropped()))

    def _merge_and_gather(self, rw: TokenRewrite, sel: Node, out: Node, lp: LayerPlan):
        """Merge variant: split ``(kept, src, dst)``, tag the packed selection when something is
        merged, merge size-weighted (:func:`~vitprune.ops.merge.merge_tokens`) and gather the kept
        tokens and sizes. Returns ``(new_x, idx, tagged, extra nodes, own nodes)``."""
        g = rw.graph
        with g.inserting_after(sel):
            kept = g.call_function(operator.getitem, (sel, 0))
        with g.inserting_after(kept):
            src = g.call_function(operator.getitem, (sel, 1))
        with g.inserting_after(src):
            dst = g.call_function(operator.getitem, (sel, 2))
        merged_pairs = lp.r_s + (lp.r_i if self._merges_dropped() else 0)
        if merged_pairs > 0:                                     # one tagged node: kept | src | dst
            with g.inserting_after(dst):
                packed = g.call_function(pack_selection, (kept, src, dst))
            with g.inserting_after(packed):
                idx = g.call_function(packed_kept, (packed, lp.n_out))
            tag_token_select(packed, block=lp.block, kind="merge", tokens_in=lp.n_in, n_keep=lp.n_out, r_s=merged_pairs)
            copy_source_meta(packed, out)
        else:                                                    # nothing merged: a plain pruning layer
            with g.inserting_after(dst):
                idx = g.call_function(mark, (kept,))
        cur, own = idx, []
        if rw.size is None:
            with g.inserting_after(cur):
                cur = rw.unit_sizes(out)
            own.append(cur)
        with g.inserting_after(cur):
            merged = g.call_function(merge_tokens, (out, rw.size, src, dst))
        own.append(merged)
        with g.inserting_after(merged):
            src_x = g.call_function(operator.getitem, (merged, 0))
        with g.inserting_after(src_x):
            src_size = g.call_function(operator.getitem, (merged, 1))
        with g.inserting_after(src_size):
            new_x = g.call_function(gather_tokens, (src_x, idx))
        with g.inserting_after(new_x):
            rw.size = g.call_function(gather_tokens, (src_size, idx))
        return new_x, idx, merged_pairs > 0, [kept, src, dst, src_x, src_size, rw.size, merged], own


def all_indices(x: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` indices ``0..N-1`` of tokens ``x [B, N, C]`` (a layer that keeps every token)."""
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], x.shape[1])


def default_prune_blocks(depth: int, n_layers: Optional[int] = None) -> list[int]:
    """Default pruning layers (0-based block indices; a layer sits after that block's output).

    Without ``n_layers``: every other block from a quarter of the depth to the third-to-last
    block, ``range(depth // 4, depth - 2, 2)``: ``[3, 5, 7, 9]`` for 12 blocks (after blocks
    4/6/8/10, 1-based). With ``n_layers`` (a per-layer ``keep``/``counts`` list given without
    ``prune_blocks``): that many layers evenly spaced, the first after a quarter of the depth
    (``[3, 6, 9]`` for 3 of 12).

    Four layers is the accuracy default; the presets, the paper's throughput configurations,
    use three (``n_layers=3``). Why: docs/decisions.md ("Pruning layers after blocks 3/5/7/9").
    """
    if n_layers is None:
        return list(range(depth // 4, max(depth - 2, depth // 4 + 1), 2))
    blocks = [int(round(depth * (i + 1) / (n_layers + 1))) for i in range(n_layers)]
    blocks = [min(max(b, 0), depth - 2) for b in blocks]
    return sorted(set(blocks))


def tokens_per_block(info: ViTDims, plans: list[LayerPlan]) -> list[int]:
    """Tokens (prefix included) entering each block."""
    n_at = [info.tokens] * info.depth
    for lp in plans:
        for blk in range(lp.block + 1, info.depth):
            n_at[blk] = lp.n_out
    return n_at


def _index_nodes(gm: GraphModule) -> list[tuple[dict, Node]]:
    """For each tagged Zero-TPrune layer, its tag and the node holding its kept indices: kind
    ``"prune"`` (value ``[B, K]``) or ``"merge"`` (value ``kept | src | dst``, :func:`~vitprune.ops.merge.pack_selection`)."""
    return [(tag, node) for node, tag in token_select_outputs(gm) if tag.get("kind") in ("prune", "merge")]


@torch.no_grad()
def kept_token_indices(module, x: torch.Tensor) -> list[torch.Tensor]:
    """Kept token indices of every Zero-TPrune pruning layer, for images ``x``.

    Args:
        module: a GraphModule produced by :class:`ZeroTPrune` (or a ``CompiledModule``, whose
            ``graph_module`` is used).
        x: ``[B, 3, H, W]`` images.

    Returns:
        one ``[B, K_l]`` int64 tensor per pruning layer, in layer order: indices into the
        *original* token sequence (0 = CLS; patch ``p`` is token ``p + num_prefix``),
        ascending. Empty when the graph has no Zero-TPrune layer.
    """
    gm = getattr(module, "graph_module", module)
    wanted = _index_nodes(gm)
    if not wanted:
        return []
    values = node_values(gm, (x,), {n for _, n in wanted})
    result, prev = [], None
    for tag, node in wanted:
        idx = decode_selection(tag, values[node])[0]
        orig = idx if prev is None else gather_tokens(prev, idx)
        result.append(orig)
        prev = orig
    return result


__all__ = ["ZeroTPrune", "LayerPlan", "ViTDims", "kept_token_indices", "default_prune_blocks", "PRESETS"]
