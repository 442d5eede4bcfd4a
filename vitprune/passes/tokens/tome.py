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
from torch.fx import GraphModule, Node

from ...errors import InvalidPassConfigError
from ...ir.flops import gmacs
from ...ir.capture import recapture
from ...ir.match import find_attention_sites
from ...ir.rewrite import copy_source_meta, relax_token_dim
from ...ir.sites import AttentionSite
from ...ir.tags import tag_token_select
from ...ops import tome as tome_ops
from ...ops.merge import merge_packed, unit_sizes
from ..base import Pass, PassContext, register_pass
from ...ir.attention import add_size_bias
from ...ir.cost import BlockDims

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


@dataclass
class ModelDims:
    """What the MAC model of a plain ViT needs, read from attention sites: token counts and
    each block's widths (:class:`~vitprune.ir.cost.BlockDims`; they differ after SNP).

    ``other_macs``: MACs outside the blocks (patch embedding, head), per image.
    """

    depth: int
    tokens: int
    prefix: int
    embed_dim: int
    blocks: list[BlockDims]
    other_macs: float = 0.0

    @classmethod
    def from_sites(cls, sites: list[AttentionSite]) -> "ModelDims":
        s = sites[0]
        return cls(len(sites), s.num_tokens, s.num_prefix_tokens, s.embed_dim, [BlockDims.from_site(x) for x in sites])


def clamp_schedule(dims: ModelDims, schedule: list[int]) -> list[int]:
    """Cap each count at ToMe's limit (half of the non-prefix tokens at that block)."""
    n, out = dims.tokens, []
    for r in schedule[: dims.depth]:
        r = max(0, min(int(r), tome_ops.max_merge(n, dims.prefix)))
        out.append(r)
        n -= r
    return out + [0] * (dims.depth - len(out))


def tome_gmacs(dims: ModelDims, schedule: list[int]) -> float:
    """Analytic GMACs per image of a ToMe-merged ViT (ALGORITHMS.md §1d FLOPs model, plus the
    merge's own work): per block attention at ``N_i`` tokens, matching ``⌈N/2⌉·⌊N/2⌋·d`` and
    merge ``(N−r)·r·(C+1)`` MACs, MLP at ``N_i − r_i`` tokens."""
    n, total, dim = dims.tokens, dims.other_macs, dims.embed_dim
    for r, b in zip(schedule, dims.blocks):
        total += b.attn_macs(n, dim)
        if r > 0:
            total += ((n + 1) // 2) * (n // 2) * b.qk + (n - r) * r * (dim + 1)
        n -= r
        total += b.mlp_macs(n, dim)
    return total / 1e9


def solve_rate(dims: ModelDims, target: float, tol: float = 0.01) -> list[int]:
    """The fractional-constant-rate schedule (:func:`rate_schedule`) whose analytic GMACs is the
    largest not above ``target`` (bisection on the rate).

    Raises:
        InvalidPassConfigError: ``target`` below what ToMe can reach (every block merging its
            maximum) by more than ``tol``, or not below the unpruned count.
    """
    full = tome_gmacs(dims, [0] * dims.depth)
    if target >= full:
        raise InvalidPassConfigError(
            f"tome: target_gmacs={target} is not below the unpruned model's {full:.4f} GMACs; use a smaller budget")
    hi = float(dims.tokens)
    floor_g = tome_gmacs(dims, clamp_schedule(dims, rate_schedule(hi, dims.depth)))
    if target < floor_g * (1 - tol):
        raise InvalidPassConfigError(
            f"tome: target_gmacs={target} is below the {floor_g:.4f} GMACs ToMe reaches when every block merges half "
            f"its tokens; valid range ({floor_g:.4f}, {full:.4f})")
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if tome_gmacs(dims, clamp_schedule(dims, rate_schedule(mid, dims.depth))) > target:
            lo = mid
        else:
            hi = mid
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
            ``inflection`` outside [-1, 1]; a budget ToMe cannot reach (checked when run, before
            the graph is edited).
    """

    r: Optional[Union[int, list[int]]] = None
    inflection: float = 0.0
    target_gmacs: Optional[float] = None
    prop_attn: bool = True

    def validate(self) -> None:
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

    def schedule(self, gm: GraphModule, sites: Optional[list] = None) -> tuple[list[int], ModelDims]:
        """The capped per-block merge counts this config gives on ``gm``, and the model dims
        (with ``other_macs`` measured)."""
        sites = sites if sites is not None else find_attention_sites(gm)
        if not sites:
            raise InvalidPassConfigError("tome: the model has no attention blocks to merge tokens in")
        dims = ModelDims.from_sites(sites)
        image = tuple(self._image_shape)
        dims.other_macs = gmacs(gm, image) * 1e9 - tome_gmacs(dims, [0] * dims.depth) * 1e9
        if self.target_gmacs is not None:
            return solve_rate(dims, float(self.target_gmacs)), dims
        return clamp_schedule(dims, parse_r(self.r, dims.depth, self.inflection)), dims

    _image_shape = (3, 224, 224)

    def rewrite(self, gm: GraphModule, ctx: PassContext) -> GraphModule:
        self._image_shape = tuple(ctx.example_inputs[0].shape[1:])
        sites = find_attention_sites(gm)
        sched, dims = self.schedule(gm, sites)
        predicted = tome_gmacs(dims, sched)
        tokens = [dims.tokens]
        for r in sched:
            tokens.append(tokens[-1] - r)
        if sum(sched) == 0:
            ctx.record(schedule=sched, tokens=tokens, gmacs_predicted=round(predicted, 4))
            return gm
        g = gm.graph
        size: Optional[Node] = None
        first_out: Optional[Node] = None
        n = dims.tokens
        for site, r in zip(sites, sched):
            if size is not None and self.prop_attn:
                add_size_bias(gm, site, size)
            if r == 0:
                continue
            x = site.attn_residual
            with g.inserting_before(x.next):
                metric = copy_source_meta(g.call_function(head_mean_keys, (site.k,)), x)
                own = set()
                if size is None:
                    size = copy_source_meta(g.call_function(unit_sizes, (x,)), x)
                    own.add(size)
                packed = copy_source_meta(g.call_function(tome_ops.bipartite_soft_matching, (metric, r, dims.prefix)), x)
                tag_token_select(packed, block=site.block_index, kind="tome", tokens_in=n, r=r, n_keep=n - r)
                merged = copy_source_meta(g.call_function(merge_packed, (x, size, packed, n - r)), x)
                own.add(merged)
                x_new = copy_source_meta(g.call_function(operator.getitem, (merged, 0)), x)
                size = copy_source_meta(g.call_function(operator.getitem, (merged, 1)), x)
            x.replace_all_uses_with(x_new, delete_user_cb=lambda u, own=own: u not in own)
            first_out = first_out or x_new
            n -= r
        relax_token_dim(gm, first_out, dims.tokens)
        gm = recapture(gm, ctx.example_inputs)
        measured = gmacs(gm, self._image_shape)
        ctx.record(schedule=sched, tokens=tokens, gmacs_predicted=round(predicted, 4), gmacs_measured=round(measured, 4))
        if self.target_gmacs is not None and abs(measured - self.target_gmacs) > 0.01 * self.target_gmacs:
            raise InvalidPassConfigError(
                f"tome: measured {measured:.4f} GMACs is not within 1% of target_gmacs={self.target_gmacs} "
                f"(analytic {predicted:.4f}); the model's blocks do not follow the plain ViT MAC model")
        return gm

