"""ToMe pass: bipartite soft matching token merging inside every block (ALGORITHMS.md §3).

Per block ``i`` with ``r_i > 0``, between the attention residual and the MLP (where ToMe acts):

    metric = mean_h k          [B, N, d]    keys averaged over heads
    x, size = merge(x, size, bipartite_soft_matching(metric, r_i))      [B, N - r_i, ·]

Token sizes ``[B, N, 1]`` are carried as graph values from the first merge on, and every later
block gets proportional attention (``+log(size)`` on the attention logits, before softmax, on
explicit attention). All ops are export-clean (:mod:`vitprune.ops.tome`).

Source: Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (§3, off-the-shelf models
use proportional attention); reference ``facebookresearch/ToMe`` ``tome/patch/timm.py``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.fx import GraphModule

from ...errors import InvalidPassConfigError
from ...ir.cost import ViTDims, bisect_budget
from ...ir.flops import gmacs
from ...ir.match import find_attention_sites
from ...ir.tags import tag_token_select
from ...ops import tome as tome_ops
from ...ops.merge import merge_packed
from ..base import Pass, PassContext, register_pass
from .skeleton import TokenRewrite, require_unreduced_tokens

aten = torch.ops.aten


# ---------------------------------------------------------------- schedules and MAC counts

def parse_r(r: Union[int, list, tuple], depth: int, inflection: float = 0.0) -> list[int]:
    """Per-block merge counts from ToMe's schedule forms (ToMe ``tome/utils.py`` ``parse_r``).

    * ``int``: constant ``r`` in every block, bent by ``inflection`` in ``[-1, 1]``: counts go
      linearly from ``r·(1 - inflection)`` to ``r·(1 + inflection)`` (−1 = decreasing, 0 = constant,
      1 = increasing), keeping the mean ``r``;
    * ``list``: explicit counts, padded with zeros to ``depth``;
    * ``(r, inflection)`` tuple.
    """
    if isinstance(r, tuple):
        r, inflection = r
    if isinstance(r, list):
        return [int(v) for v in r] + [0] * (depth - len(r))
    lo = int(r * (1.0 - inflection))
    hi = 2 * r - lo
    step = (hi - lo) / max(depth - 1, 1)
    return [int(lo + step * i) for i in range(depth)]


def rate_schedule(rate: float, depth: int) -> list[int]:
    """Integer counts whose running sum tracks ``rate`` tokens per block (a constant, possibly
    fractional, ToMe ``r``): ``r_i = floor(rate·(i+1)) − floor(rate·i)``."""
    return [int(math.floor(rate * (i + 1) + 1e-9) - math.floor(rate * i + 1e-9)) for i in range(depth)]


def clamp_schedule(dims: ViTDims, schedule: list[int]) -> list[int]:
    """Cap each count at ToMe's limit (half of the non-prefix tokens at that block)."""
    n, out = dims.tokens, []
    for r in schedule[: dims.depth]:
        r = max(0, min(int(r), tome_ops.max_merge(n, dims.prefix)))
        out.append(r)
        n -= r
    return out + [0] * (dims.depth - len(out))


def tome_gmacs(dims: ViTDims, schedule: list[int], other_macs: float = 0.0) -> float:
    """Analytic GMACs per image of a ToMe-merged ViT (ALGORITHMS.md §1d FLOPs model, plus the
    merge's own work): ``other_macs`` (patch embedding, head) plus per block attention at ``N_i``
    tokens, matching ``⌈N/2⌉·⌊N/2⌋·d`` and merge ``(N−r)·r·(C+1)`` MACs, MLP at ``N_i − r_i`` tokens."""
    n, total, dim = dims.tokens, other_macs, dims.embed_dim
    for r, b in zip(schedule, dims.blocks):
        total += b.attn_macs(n, dim)
        if r > 0:
            total += ((n + 1) // 2) * (n // 2) * b.qk + (n - r) * r * (dim + 1)
        n -= r
        total += b.mlp_macs(n, dim)
    return total / 1e9


def solve_rate(dims: ViTDims, target: float, other_macs: float, tol: float = 0.01) -> list[int]:
    """The fractional-constant-rate schedule (:func:`rate_schedule`) whose analytic GMACs is the
    largest not above ``target`` (bisection on the rate).

    Raises:
        InvalidPassConfigError: ``target`` below what ToMe can reach (every block merging its
            maximum) by more than ``tol``, or not below the unpruned count.
    """
    def g(rate: float) -> float:
        return tome_gmacs(dims, clamp_schedule(dims, rate_schedule(rate, dims.depth)), other_macs)

    full = tome_gmacs(dims, [0] * dims.depth, other_macs)
    if target >= full:
        raise InvalidPassConfigError(
            f"tome: target_gmacs={target} is not below the unpruned model's {full:.4f} GMACs; use a smaller budget")
    hi = float(dims.tokens)
    floor_g = g(hi)
    if target < floor_g * (1 - tol):
        raise InvalidPassConfigError(
            f"tome: target_gmacs={target} is below the {floor_g:.4f} GMACs ToMe reaches when every block merges half "
            f"its tokens; valid range ({floor_g:.4f}, {full:.4f})")
    _, hi = bisect_budget(g, 0.0, hi, target, iters=60, increasing=False)
    return clamp_schedule(dims, rate_schedule(hi, dims.depth))


# ---------------------------------------------------------------- graph helpers (traced by export)

def head_mean_keys(k: torch.Tensor) -> torch.Tensor:
    """ToMe's matching feature: keys ``[B, H, N, d]`` averaged over heads -> ``[B, N, d]``."""
    return k.mean(dim=1)


# ---------------------------------------------------------------- the pass

@register_pass("tome")
@dataclass
class ToMe(Pass):
    """Token Merging (ToMe) of pre-trained ViTs, no training (ALGORITHMS.md §3).

    Args:
        r: tokens merged per block: an int (constant, bent by ``inflection``) or a per-block list
            (padded with zeros). Each count is capped at half the non-prefix tokens of its block.
        inflection: ToMe's schedule bend in ``[-1, 1]`` for an int ``r`` (−1 decreasing).
        target_gmacs: instead of ``r``, a budget in GMACs per image; the pass solves a constant
            (fractional, dithered to integers) rate whose analytic count is within 1 % of it and
            checks the result with ``gmacs()``.
        prop_attn: proportional attention (``+log(size)`` on attention logits) after the first merge.

    Raises:
        InvalidPassConfigError: neither or both of ``r``/``target_gmacs``; negative counts;
            ``inflection`` outside [-1, 1]; a budget ToMe cannot reach, or tokens an earlier
            token pass already reduced (both checked when run, before the graph is edited).
    """

    r: Optional[Union[int, list[int]]] = None
    inflection: float = 0.0
    target_gmacs: Optional[float] = None
    prop_attn: bool = True

    def validate(self) -> None:
        super().validate()
        if (self.r is None) == (self.target_gmacs is None):
            raise InvalidPassConfigError(
                f"tome: give exactly one of r (tokens merged per block) or target_gmacs, got r={self.r}, "
                f"target_gmacs={self.target_gmacs}")
        if self.r is not None:
            vals = self.r if isinstance(self.r, list) else [self.r]
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in vals):
                raise InvalidPassConfigError(f"tome: r={self.r} must be a non-negative int or a list of them")
        if not (-1.0 <= float(self.inflection) <= 1.0):
            raise InvalidPassConfigError(f"tome: inflection={self.inflection} outside the valid range [-1, 1]")
        if self.target_gmacs is not None and not (isinstance(self.target_gmacs, (int, float)) and self.target_gmacs > 0):
            raise InvalidPassConfigError(f"tome: target_gmacs={self.target_gmacs} must be a positive number of GMACs")

    def schedule(self, gm: GraphModule, sites: Optional[list] = None,
                 image_shape=(3, 224, 224)) -> tuple[list[int], ViTDims, float]:
        """The capped per-block merge counts this config gives on ``gm``, the model's dims, and its
        MACs outside the blocks (patch embedding, head; measured dense GMACs minus the blocks')."""
        sites = sites if sites is not None else find_attention_sites(gm)
        if not sites:
            raise InvalidPassConfigError("tome: the model has no attention blocks to merge tokens in")
        require_unreduced_tokens("tome", gm, sites)
        dims = ViTDims.from_graph(gm, sites, image_shape)
        other = dims.dense_gmacs * 1e9 - tome_gmacs(dims, [0] * dims.depth) * 1e9
        if self.target_gmacs is not None:
            return solve_rate(dims, float(self.target_gmacs), other), dims, other
        return clamp_schedule(dims, parse_r(self.r, dims.depth, self.inflection)), dims, other

    def rewrite(self, gm: GraphModule, ctx: PassContext) -> GraphModule:
        image_shape = tuple(ctx.example_inputs[0].shape[1:])
        sites = find_attention_sites(gm)
        sched, dims, other = self.schedule(gm, sites, image_shape)
        predicted = tome_gmacs(dims, sched, other)
        tokens = [dims.tokens]
        for r in sched:
            tokens.append(tokens[-1] - r)
        if sum(sched) == 0:
            ctx.record(schedule=sched, tokens=tokens, gmacs_predicted=round(predicted, 4))
            return gm
        rw = TokenRewrite(gm, dims.tokens, proportional=self.prop_attn)
        g, n = gm.graph, dims.tokens
        for site, r in zip(sites, sched):
            rw.enter_block(site)
            if r == 0:
                continue
            x = site.attn_residual
            with g.inserting_before(x.next):
                metric = rw.call(head_mean_keys, (site.k,), x)
                own = set() if rw.size is not None else {rw.unit_sizes(x)}
                packed = rw.call(tome_ops.bipartite_soft_matching, (metric, r, dims.prefix), x)
                tag_token_select(packed, block=site.block_index, kind="tome", tokens_in=n, r=r, n_keep=n - r)
                merged = rw.call(merge_packed, (x, rw.size, packed, n - r), x)
                own.add(merged)
                x_new = rw.call(operator.getitem, (merged, 0), x)
                rw.size = rw.call(operator.getitem, (merged, 1), x)
            rw.replace(x, x_new, own)
            n -= r
        gm = rw.finish(ctx.example_inputs)
        measured = gmacs(gm, image_shape)
        ctx.record(schedule=sched, tokens=tokens, gmacs_predicted=round(predicted, 4), gmacs_measured=round(measured, 4))
        if self.target_gmacs is not None and abs(measured - self.target_gmacs) > 0.01 * self.target_gmacs:
            raise InvalidPassConfigError(
                f"tome: measured {measured:.4f} GMACs is not within 1% of target_gmacs={self.target_gmacs} "
                f"(analytic {predicted:.4f}); the model's blocks do not follow the plain ViT MAC model")
        return gm

