"""Global, sensitivity-based allocation of SNP's kept widths (Kwon et al. 2022, "A Fast
Post-Training Pruning Framework for Transformers", §4.1: Fisher-based mask search under a FLOPs
constraint, solved as a knapsack problem).

Instead of one uniform ratio for every block, the widths are chosen across all blocks at once:
each *removal unit* costs its Fisher information (:mod:`vitprune.passes.snp.sensitivity`,
estimated loss increase ``1/2 sum F_ii``) and saves a known number of MACs
(:func:`vitprune.passes.snp.snp.block_macs`). Units are

* one q-k pair in EVERY head of block ``l`` (SNP needs the same width in all heads of a block,
  ALGORITHMS.md §2g pitfall 2): cost = sum over heads of the head's next-lowest pair score;
* one value neuron in every head of block ``l`` (same rule);
* one fc1 neuron of block ``l``.

Within a block and kind, units are taken in increasing score order, so their costs increase and
the greedy choice of the unit with the lowest cost per MAC saved, repeated until the MAC budget
is met, is the knapsack's greedy (fractional-relaxation) solution. ``round_to`` makes each unit
``round_to`` neurons wide (kept widths multiples of ``round_to``); every head keeps at least
``round_to`` neurons of each kind and every MLP at least ``round_to`` neurons.
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

import torch

from ...errors import InvalidPassConfigError
from ...ir.cost import bisect_budget
from .engine import BlockPlan
from .sensitivity import BlockScores


def allocate(full: Sequence[BlockPlan], scores: Sequence[BlockScores], macs: Callable[[int, BlockPlan], float],
             target_macs: float, round_to: int = 1) -> list[BlockPlan]:
    """Kept widths per block meeting ``sum_l macs(l, plan_l) <= target_macs`` at least Fisher cost.

    Args:
        full: the unpruned widths of every block (``heads``, ``qk``, ``v``, ``mlp``).
        scores: Fisher scores of every block (``qk`` ``[H, d]``, ``v`` ``[H, d_v]``, ``fc1`` ``[M]``).
        macs: ``macs(block_index, plan)``: analytic MACs of one block with widths ``plan``.
        target_macs: MAC budget for all blocks together.
        round_to: granularity of the kept widths.

    Returns:
        one :class:`BlockPlan` per block (heads unchanged).

    Raises:
        InvalidPassConfigError: the budget cannot be met even at the minimum widths, or the
            scores do not match the blocks.
    """
    if len(full) != len(scores):
        raise InvalidPassConfigError(f"snp allocation: {len(scores)} score sets for {len(full)} blocks")
    step = max(1, int(round_to))
    plans = [BlockPlan(p.heads, p.qk, p.v, p.mlp) for p in full]
    # per block and kind: ascending unit costs (a unit = `step` neurons in every head)
    costs: dict = {}
    for li, (p, s) in enumerate(zip(full, scores)):
        if tuple(s.qk.shape) != (p.heads, p.qk) or tuple(s.v.shape) != (p.heads, p.v):
            raise InvalidPassConfigError(f"snp allocation: block {li} scores {tuple(s.qk.shape)}/{tuple(s.v.shape)} "
                                         f"do not match widths {p.heads}x{p.qk}/{p.heads}x{p.v}")
        costs[li, "qk"] = _unit_costs(s.qk, step)
        costs[li, "v"] = _unit_costs(s.v, step)
        if p.mlp and s.fc1 is not None:
            costs[li, "mlp"] = _unit_costs(s.fc1[None], step)
    taken = {k: 0 for k in costs}
    total = sum(macs(li, p) for li, p in enumerate(plans))
    heap: list = []

    def push(key):
        li, kind = key
        n = taken[key]
        c = costs[key]
        if n >= len(c) or getattr(plans[li], kind) - step < step:
            return
        after = _with(plans[li], kind, getattr(plans[li], kind) - step)
        saved = macs(li, plans[li]) - macs(li, after)
        if saved <= 0:
            return
        heapq.heappush(heap, (float(c[n]) / saved, li, kind))

    for key in costs:
        push(key)
    while total > target_macs:
        if not heap:
            raise InvalidPassConfigError(
                f"snp allocation: cannot reach {target_macs / 1e9:.4f} GMACs in the blocks; the minimum widths give "
                f"{total / 1e9:.4f}")
        _, li, kind = heapq.heappop(heap)
        before = macs(li, plans[li])
        plans[li] = _with(plans[li], kind, getattr(plans[li], kind) - step)
        total += macs(li, plans[li]) - before
        taken[li, kind] += 1
        push((li, kind))
    return plans


def _unit_costs(s: torch.Tensor, step: int) -> torch.Tensor:
    """``s`` ``[G, n]`` -> cost of removing the next ``step`` lowest-scored neurons of every group:
    ``[n // step]`` (sum over groups of their sorted scores, in blocks of ``step``)."""
    srt = torch.sort(s.double(), dim=-1).values.sum(0)  # [n]
    k = srt.shape[0] // step
    return srt[: k * step].reshape(k, step).sum(-1)


def _with(p: BlockPlan, kind: str, value: int) -> BlockPlan:
    d = dict(heads=p.heads, qk=p.qk, v=p.v, mlp=p.mlp)
    d[kind] = value
    return BlockPlan(**d)


def recovery_weighted(scores: Sequence[BlockScores], records: Sequence[dict], floor: float = 1e-3) -> list[BlockScores]:
    """Fisher scores scaled by what the least-squares recovery leaves of each block's error.

    The Fisher cost of a removal is a second-order estimate of the loss increase from the
    perturbation of the block output (``1/2 e^T F e``), which scales with ``||e||^2``. The refit of
    proj / fc2 shrinks that perturbation to ``err / err_sliced`` of its size (relative squared
    reconstruction errors after and before the refit, measured on the calibration images by a dry
    run at the uniform widths, :func:`vitprune.passes.snp.engine.prune_blocks`). Scaling the costs
    of q-k pairs and value neurons by the attention ratio and of fc1 neurons by the MLP ratio
    makes the greedy allocation spend the MAC budget where the refit repairs the damage, rather
    than where the un-refit damage is small (Kwon et al. 2022 §4.1 search with §4.3 recovery
    folded into the cost; cf. OBS, Hassibi & Stork 1993, whose saliency is the loss after the
    optimal compensation of the remaining weights).

    Args:
        scores: per-block Fisher scores of the original model.
        records: per-block records of the dry run (``attn_err_cv`` or else ``attn_err``,
            ``attn_err_sliced``, and the same for ``mlp``; missing keys leave that block's scores unscaled).
        floor: smallest factor (a refit that looks perfect on the calibration images still costs).
    """
    def ratio(rec, part):
        before = rec.get(f"{part}_err_sliced")
        after = rec.get(f"{part}_err_cv", rec.get(f"{part}_err"))
        if before is None or after is None or before <= 0:
            return 1.0
        return min(1.0, max(floor, after / before))

    out = []
    for s, rec in zip(scores, records):
        fa, fm = ratio(rec, "attn"), ratio(rec, "mlp")
        out.append(BlockScores(qk=s.qk * fa, v=s.v * fa, head=s.head * fa,
                               fc1=s.fc1 * fm if s.fc1 is not None else None,
                               attn_tokens=s.attn_tokens, mlp_tokens=s.mlp_tokens))
    return out


def blend_plans(full: Sequence[BlockPlan], alloc: Sequence[BlockPlan], uniform: Sequence[BlockPlan],
                macs: Callable[[int, BlockPlan], float], target_macs: float, beta: float,
                round_to: int = 1) -> list[BlockPlan]:
    """Widths between a sensitivity allocation and the uniform one, meeting the same MAC budget.

    Kept fractions are blended geometrically, ``k = k_alloc^beta * k_uniform^(1 - beta)`` per block
    and kind (shrinkage of a noisy per-block estimate towards the uniform prior), then every removed
    fraction ``1 - k`` is scaled by one factor, found by bisection, so the blocks meet
    ``target_macs`` (the largest widths that do). ``beta=1``: ``alloc``; ``beta=0``: ``uniform``.
    """
    step = max(1, int(round_to))
    kinds = ("qk", "v", "mlp")
    removed = []
    for f, a, u in zip(full, alloc, uniform):
        r = {}
        for k in kinds:
            n = getattr(f, k)
            if not n:
                continue
            ka, ku = getattr(a, k) / n, getattr(u, k) / n
            r[k] = 1.0 - (ka ** beta) * (ku ** (1.0 - beta))
        removed.append(r)

    def plans_at(c):
        out = []
        for f, r in zip(full, removed):
            d = dict(heads=f.heads, qk=f.qk, v=f.v, mlp=f.mlp)
            for k, rk in r.items():
                n = getattr(f, k)
                keep = n - int(round(n * min(1.0, c * rk)))
                if step > 1:
                    keep = int(round(keep / step)) * step
                d[k] = min(n, max(step, keep))
            out.append(BlockPlan(**d))
        return out

    def total(c):
        return sum(macs(i, p) for i, p in enumerate(plans_at(c)))

    hi = 1.0
    while total(hi) > target_macs and hi < 64:
        hi *= 2
    _, hi = bisect_budget(total, 0.0, hi, target_macs, iters=50, increasing=False)
    return plans_at(hi)
