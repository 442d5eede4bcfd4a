"""SNP: structured neuron-level pruning (Shim et al., ECCV 2024; ALGORITHMS.md §2) as a graph pass,
with zero-shot least-squares recovery instead of 300 epochs of fine-tuning.

``snp:preset=deit-s`` (released kept widths, §2c), ``snp:ratio=0.2`` (uniform fraction of
q-k pairs, value neurons and fc1 neurons removed in every block), per-layer ``qk=``, ``v=``,
``fc1=`` lists, or ``target_gmacs=`` (uniform ratio found by bisection on the analytic MAC
count). ``embed=`` removes residual-stream channels (timm models).

``allocation=fisher`` (with ``ratio=`` or ``target_gmacs=``) spends the same MAC budget
non-uniformly: the per-block widths are chosen globally by Fisher sensitivity per MAC saved
(Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers", §4.1;
:mod:`vitprune.passes.snp.allocation`), then the usual block-by-block selection and
least-squares recovery run with those widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch.fx import GraphModule

from ...errors import InvalidPassConfigError
from ...ir.match import find_attention_sites
from ...ir.sites import AttentionSite
from ...ir.tags import token_select_outputs
from ...progress import Detail
from ..base import Pass, PassContext, register_pass
from .engine import BlockPlan, Criterion, can_take_original, prune_blocks
from .options import BLOCK_BATCH_COST, FISHER_BATCH_COST, RecoveryOptions, block_steps
from .presets import PRESETS, preset_name
from .surgery import finalize, value_head_dim
from ...ir.cost import BlockDims, bisect_budget

Allocation = Literal["uniform", "fisher", "recovery"]


def kept(n: int, ratio: float, round_to: int = 1) -> int:
    """Kept count ``n - round(n * ratio)``, optionally rounded to a multiple of ``round_to``
    (at least ``round_to``, at most ``n``)."""
    k = n - int(round(n * ratio))
    return round_widths([k], round_to, n)[0] if k > 0 else k


def round_widths(widths: list[int], multiple: int, full: int) -> list[int]:
    """Widths rounded to multiples of ``multiple`` (in ``[multiple, full]``) by error diffusion:
    each width is rounded after adding the rounding error carried from the previous ones, so the
    sum (and, as every block has the same MACs per unit of a given width, the MACs) stays within
    ``multiple / 2`` of the original sum instead of drifting by up to ``len(widths) * multiple / 2``.
    ``multiple=1`` returns the widths unchanged."""
    if multiple <= 1:
        return list(widths)
    out, carry = [], 0.0
    for w in widths:
        want = w + carry
        k = min(full, max(multiple, int(round(want / multiple)) * multiple))
        carry = want - k
        out.append(k)
    return out


def block_macs(tokens: int, dim: int, heads: int, qk: int, v: int, mlp: int) -> float:
    """MACs of one block: q/k/v projections ``N·D·H·(2 d_qk + d_v)``, logits ``N²·H·d_qk``,
    probs@v ``N²·H·d_v``, proj ``N·H·d_v·D``, MLP ``2·N·D·M``."""
    return BlockDims(heads=heads, qk=qk, v=v, mlp_hidden=mlp).block_macs(tokens, dim)


#: default ``round_to`` candidates for a preset, widest first, and how far (relative) the rounded
#: preset's GMACs may lie from the released widths' (docs/decisions.md, "SNP: round_to")
PRESET_ROUND_TO = (16, 8)
PRESET_ROUND_TOL = 0.01


def preset_widths(key: str, round_to: int) -> tuple[list[int], list[int], list[int], int]:
    """A preset's kept widths ``(qk, v, mlp, embed)`` (per head for q-k and v, per block for the MLP,
    the residual width) rounded to multiples of ``round_to`` by :func:`round_widths`.

    Raises:
        KeyError: ``key`` is not a key of :data:`vitprune.passes.snp.presets.PRESETS`.
    """
    p = PRESETS[key]
    a = p["arch"]
    return (round_widths(p["qk"], round_to, a["head_dim"]), round_widths(p["v"], round_to, a["head_dim"]),
            round_widths(p["mlp"], round_to, a["mlp"]), round_widths([p["embed"]], round_to, a["embed_dim"])[0])


def preset_gmacs(key: str, round_to: int, tokens: int = 197) -> float:
    """Analytic GMACs per image of a preset's blocks and 16x16 patch embedding at ``tokens`` tokens
    (197: 224x224 input with a CLS token), widths rounded to ``round_to`` (:func:`block_macs`)."""
    qk, v, mlp, embed = preset_widths(key, round_to)
    heads = PRESETS[key]["arch"]["num_heads"]
    macs = sum(block_macs(tokens, embed, heads, qk[i], v[i], mlp[i]) for i in range(len(qk)))
    return (macs + (tokens - 1) * embed * 3 * 16 * 16) / 1e9


def preset_round_to(preset: str) -> int:
    """A preset's default ``round_to``: the widest of :data:`PRESET_ROUND_TO` whose rounded widths keep
    the analytic GMACs within :data:`PRESET_ROUND_TOL` of the released widths' (16 for ``deit-s`` and
    ``deit-b``, 8 for ``deit-t`` and ``deit-s-small``); ALGORITHMS.md §2g pitfall 6 (odd widths waste
    GEMM tiles).

    Raises:
        InvalidPassConfigError: an unknown preset.
    """
    key = preset_name(preset)
    if key not in PRESETS:
        raise InvalidPassConfigError(f"snp: unknown preset '{preset}'; choose from {', '.join(sorted(PRESETS))}")
    released = preset_gmacs(key, 1)
    for r in PRESET_ROUND_TO:
        if abs(preset_gmacs(key, r) / released - 1) <= PRESET_ROUND_TOL:
            return r
    return PRESET_ROUND_TO[-1]


def _check_ratio(name: str, value, allow_list: bool = True) -> None:
    vals = value if isinstance(value, (list, tuple)) else [value]
    for i, r in enumerate(vals):
        if not isinstance(r, (int, float)) or not (0.0 <= float(r) < 1.0):
            where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
            raise InvalidPassConfigError(f"snp: {where}={r!r} is outside [0, 1) (fraction of neurons removed)")


#: the largest uniform ratio ``target_gmacs`` bisects over (and so the least SNP can leave)
MAX_RATIO = 0.99


@register_pass("snp")
@dataclass
class SNP(RecoveryOptions, Pass):
    """Structured neuron-level pruning with zero-shot recovery.

    Args:
        preset: ``deit-t``, ``deit-s``, ``deit-s-small``, ``deit-b`` (released widths, §2c).
        ratio: uniform fraction removed of q-k pairs, value neurons and fc1 neurons, in [0, 1).
        qk, v, fc1: per-block fractions removed (override ``ratio``), each in [0, 1).
        embed: fraction of residual-stream channels removed (timm models only).
        target_gmacs: choose the uniform ``ratio`` so the model has at most this many GMACs.
        criterion: which neurons go within a block: ``snp`` (§2b: q-k pair score, 1-|cos|
            redundancy of v/fc1 weight rows) or ``activation`` (q-k pair score,
            ``||a_j||·||W_next[:, j]||`` for v/fc1) or ``lsq`` (q-k pair score; v/fc1 chosen by
            greedy least-squares removal, see :func:`vitprune.passes.snp.lstsq.greedy_lsq_select`) or
            ``fisher`` (heads, q-k pairs, v and fc1 neurons by the Fisher information of their
            masks, :mod:`vitprune.passes.snp.sensitivity`). Default ``activation``; SNP's
            weight-only scores stay available as ``snp`` (why this default: docs/decisions.md,
            "SNP: criterion").
        allocation: how many neurons each block keeps when ``ratio``/``target_gmacs`` set the
            budget: ``uniform`` (the same ratio in every block, scaled by ``mix``) or ``fisher``
            (global knapsack over all blocks by Fisher information per MAC saved, Kwon et al.
            2022 §4.1; label-free, the loss is the cross-entropy to the original model's
            predictions on the calibration images) or ``recovery`` (the Fisher allocation with
            each block's costs scaled by the fraction of its reconstruction error the
            least-squares refit leaves, cross-validated over the calibration images, measured by
            a dry run at the uniform widths; :func:`vitprune.passes.snp.allocation.recovery_weighted`).
            Ignored by ``preset`` and per-layer lists. Default ``uniform`` (why this default:
            docs/decisions.md, "SNP: allocation").
        blend: for ``fisher``/``recovery`` allocations, shrink the per-block kept fractions towards
            the uniform ones, ``k = k_alloc^blend * k_uniform^(1 - blend)``, rescaled to the same
            MAC budget (:func:`vitprune.passes.snp.allocation.blend_plans`); 1 = no shrinkage.
        mix: relative weights of the (q-k, v, fc1) ratios when ``ratio``/``target_gmacs`` sets them
            (ratio of part p = ratio · mix[p], capped at 0.95); ``0;1;1`` prunes only what the
            least-squares recovery can compensate (v, fc1).
        compensate: refit proj/fc2 by ridge least squares on calibration activations.
        sequential: feed each block the already pruned model's activations.
        calib: image folder for calibration (else ``compile(calibration=...)``).
        calib_images: number of calibration images (default 64).
        round_to: round kept widths (per head for q-k and v, per layer for fc1 and the residual
            stream) to multiples of this, >= 1. ALGORITHMS.md §2g pitfall 6: odd widths waste GEMM
            and attention-kernel tiles. Default (None): for ``preset``, 16 where that keeps the
            GMACs within 1 % of the released widths' (``deit-s``, ``deit-b``), else 8
            (:func:`preset_round_to`); 1 otherwise. Preset
            widths are rounded by error diffusion along the blocks (:func:`round_widths`), which
            keeps the width sums and the GMACs close to the released ones; ``round_to=1`` gives
            the released widths exactly (why this default: docs/decisions.md, "SNP: round_to").
        ridge: relative ridge strength of the refit; None: chosen per layer from
            ``1e-3 .. 1e3`` by two-fold cross-validation over the calibration images
            (:func:`vitprune.passes.snp.lstsq.cv_ridge`).
        recovery: ``full`` refits every weight of proj/fc2 (and the bias); ``scale`` fits one
            scale per kept input and the bias (least-squares mask tuning, Kwon et al. 2022 §4.3).
        augment: extra deterministic views of every calibration image for the statistics, scores
            and least-squares recovery (more tokens from the same images;
            :func:`vitprune.calibration.augment_views`): ``none``, ``flip`` (horizontal mirror,
            2 views), ``crops`` (the four corner crops of side 0.875, resized back: the eval
            transform's geometry at a smaller crop fraction; 5 views) or ``flip+crops`` (10
            views). Cost and the memory of the calibration tensor grow with the number of views;
            the statistics themselves are accumulated (bounded). Default ``flip+crops`` (why this
            default, and the cost: docs/decisions.md, "SNP: augment").
        shrink: the refit is shrunk towards ``zero`` (plain ridge) or the ``original`` weights of
            the kept inputs (a large ridge then means "no recovery").
        token_weight: per-token weights of the least-squares refit, which also weight the
            activation statistics ``criterion=activation`` scores v/fc1 neurons by: ``none``;
            ``ln`` (``1 / var`` over channels of the original model's residual stream after the
            block's attention/MLP branch: the error as the next LayerNorm sees it); ``fisher``
            (``||dL/dh_t||^2`` at that residual stream of the original model, L = cross-entropy to
            its own predictions, mean 1 per image; BRECQ-style; one extra forward and backward
            pass over the calibration views, :mod:`vitprune.passes.snp.sensitivity`; in the last
            block only the class token gets weight with a class-token head). Both act only with
            ``sequential`` and a residual add right after proj/fc2; ``fisher`` also needs a
            batch-first ``[B, N, D]`` residual stream, and an image whose gradients vanish gets
            weight 1 on every token (else unweighted). Default ``fisher``; pass
            ``token_weight=none`` beyond -20 % GMACs, where ``fisher`` over-fits the calibration
            images (why this default: docs/decisions.md, "SNP: token_weight").

    Raises:
        InvalidPassConfigError: ratio outside [0, 1), a ratio leaving 0 neurons in a head,
            unknown criterion/preset, a preset for another architecture, no calibration data,
            ``target_gmacs`` <= 0, not below the model's GMACs or below what SNP can reach
            (``_check_reachable``), ``round_to`` < 1, ``mix`` not 3 non-negative weights,
            ``blend`` outside [0, 1], more than one of ``preset``/``ratio``/``target_gmacs``.
        UnsupportedModelError: attention without separable q/k/v.
    """

    preset: Optional[str] = None
    ratio: Optional[float] = None
    qk: Optional[list[float]] = None
    v: Optional[list[float]] = None
    fc1: Optional[list[float]] = None
    embed: float = 0.0
    target_gmacs: Optional[float] = None
    criterion: Criterion = "activation"
    allocation: Allocation = "uniform"
    round_to: Optional[int] = None
    mix: Optional[list[float]] = None
    blend: float = 1.0

    def validate(self) -> None:
        super().validate()
        self.validate_recovery(self.name)
        if self.preset is not None and preset_name(self.preset) not in PRESETS:
            raise InvalidPassConfigError(
                f"snp: unknown preset '{self.preset}'; available: {', '.join(sorted(PRESETS))}")
        for name in ("ratio", "qk", "v", "fc1", "embed"):
            val = getattr(self, name)
            if val is not None:
                _check_ratio(name, val)
        if self.target_gmacs is not None and not (self.target_gmacs > 0):
            raise InvalidPassConfigError(f"snp: target_gmacs={self.target_gmacs} must be > 0")
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise InvalidPassConfigError(f"snp: round_to={self.round_to} must be >= 1")
        if self.mix is not None and (len(self.mix) != 3 or any(w < 0 for w in self.mix)):
            raise InvalidPassConfigError(f"snp: mix={self.mix} must be 3 non-negative weights for q-k, v, fc1")
        if not (0.0 <= self.blend <= 1.0):
            raise InvalidPassConfigError(f"snp: blend={self.blend} must be in [0, 1] (0: uniform, 1: allocation)")
        given = [n for n in ("preset", "ratio", "target_gmacs") if getattr(self, n) is not None]
        if len(given) > 1:
            raise InvalidPassConfigError(f"snp: give only one of preset, ratio, target_gmacs (got {', '.join(given)})")

    # ------------------------------------------------------------------ planning
    @property
    def granularity(self) -> int:
        """The effective ``round_to``: the preset's (:func:`preset_round_to`) for presets, 1 otherwise,
        unless set."""
        if self.round_to is not None:
            return self.round_to
        return preset_round_to(self.preset) if self.preset is not None else 1

    def uses_fisher_allocation(self) -> bool:
        """True when the widths come from :func:`vitprune.passes.snp.allocation.allocate`."""
        return (self.allocation in ("fisher", "recovery") and self.preset is None and self.qk is None and self.v is None
                and self.fc1 is None and (self.ratio is not None or self.target_gmacs is not None))

    def plans(self, sites: list[AttentionSite], rest_gmacs: float = 0.0,
              scores: Optional[list] = None) -> tuple[list[BlockPlan], Optional[int]]:
        """Kept widths per block and the kept embedding width (None = unchanged).

        ``rest_gmacs``: GMACs outside the blocks (patch embedding, head), for ``target_gmacs``.
        ``scores``: per-block Fisher scores, needed when :meth:`uses_fisher_allocation`.
        """
        if self.preset is not None:
            return self._preset_plans(sites)
        if self.uses_fisher_allocation():
            return self._fisher_plans(sites, rest_gmacs, scores), self._embed_keep(sites)
        if self.target_gmacs is not None:
            return self._bisect_plans(sites, rest_gmacs), None
        return self._ratio_plans(sites, self.ratio or 0.0), self._embed_keep(sites)

    def _budget(self, sites, rest_gmacs) -> float:
        if self.target_gmacs is not None:
            return (self.target_gmacs - rest_gmacs) * 1e9
        # the MAC budget of the uniform ratio, spent where it hurts least
        return sum(_plan_macs(s, p) for s, p in zip(sites, self._ratio_plans(sites, self.ratio)))

    def _fisher_plans(self, sites, rest_gmacs, scores) -> list[BlockPlan]:
        from .allocation import allocate, blend_plans

        if scores is None:
            raise InvalidPassConfigError(f"snp: allocation={self.allocation} needs Fisher scores (calibration images)")
        budget = self._budget(sites, rest_gmacs)
        full = [BlockPlan(s.num_heads, s.head_dim, value_head_dim(s), s.fc1.out_features if s.fc1 else None)
                for s in sites]
        macs = lambda i, p: _plan_macs(sites[i], p)  # noqa: E731
        plans = allocate(full, scores, macs, budget, self.granularity)
        if self.blend < 1.0:
            plans = blend_plans(full, plans, self.uniform_plans(sites, rest_gmacs), macs, budget, self.blend,
                                self.granularity)
        return plans

    def uniform_plans(self, sites, rest_gmacs) -> list[BlockPlan]:
        """The ``allocation=uniform`` widths for the same budget."""
        if self.target_gmacs is not None:
            return self._bisect_plans(sites, rest_gmacs)
        return self._ratio_plans(sites, self.ratio or 0.0)

    def _check_reachable(self, sites, rest_gmacs: float, total_gmacs: float) -> None:
        """Refuse a ``target_gmacs`` that the uniform ratio cannot reach on this graph, instead of a
        silently unpruned or over-budget model.

        Raises:
            InvalidPassConfigError: the target is not below the graph's GMACs, or below what removing
                the most the bisection allows (ratio ``MAX_RATIO`` in every block) leaves.
        """
        t = self.target_gmacs
        if t >= total_gmacs:
            raise InvalidPassConfigError(
                f"snp: target_gmacs={t:g} is not below the model's {total_gmacs:.3f} GMACs, so there is nothing "
                f"to prune; give a smaller target")
        floor = self._ratio_gmacs(sites, rest_gmacs, MAX_RATIO)
        if t < floor * (1 - 1e-6):
            raise InvalidPassConfigError(
                f"snp: target_gmacs={t:g} is out of reach: removing {MAX_RATIO * 100:.0f} % of the q-k pairs, value and MLP "
                f"neurons of every block leaves {floor:.3f} GMACs ({rest_gmacs:.3f} of them outside the "
                f"attention and MLP layers SNP prunes); give at least {floor:.3f}")

    def _ratio_gmacs(self, sites, rest_gmacs: float, ratio: float) -> float:
        """GMACs of the model at the uniform ``ratio`` (the analytic block MACs plus ``rest_gmacs``)."""
        return rest_gmacs + sum(_plan_macs(s, p) for s, p in zip(sites, self._ratio_plans(sites, ratio))) / 1e9

    def _bisect_plans(self, sites, rest_gmacs) -> list[BlockPlan]:
        _, hi = bisect_budget(lambda r: self._ratio_gmacs(sites, rest_gmacs, r), 0.0, MAX_RATIO, self.target_gmacs,
                              iters=40, increasing=False)
        return self._ratio_plans(sites, hi)

    def _embed_keep(self, sites):
        if not self.embed:
            return None
        return kept(sites[0].embed_dim, self.embed, self.granularity)

    def _ratio_plans(self, sites, uniform: float) -> list[BlockPlan]:
        depth = len(sites)
        out = []
        for name in ("qk", "v", "fc1"):
            lst = getattr(self, name)
            if lst is not None and len(lst) not in (1, depth):
                raise InvalidPassConfigError(f"snp: {name} has {len(lst)} ratios; the model has {depth} blocks")
        for i, s in enumerate(sites):
            def r(name):
                lst = getattr(self, name)
                if lst is not None:
                    return float(lst[0] if len(lst) == 1 else lst[i])
                w = 1.0 if self.mix is None else float(self.mix[("qk", "v", "fc1").index(name)])
                return min(0.95, uniform * w)
            d, dv = s.head_dim, value_head_dim(s)
            qk, v = kept(d, r("qk"), self.granularity), kept(dv, r("v"), self.granularity)
            for what, k, n, rr in (("q-k", qk, d, r("qk")), ("v", v, dv, r("v"))):
                if k < 1:
                    raise InvalidPassConfigError(
                        f"snp: block {i} ({s.block_path}) {what} ratio {rr} leaves 0 of {n} neurons per head")
            m = s.fc1.out_features if s.fc1 is not None else None
            mk = kept(m, r("fc1"), self.granularity) if m is not None else None
            if mk is not None and mk < 1:
                raise InvalidPassConfigError(f"snp: block {i} ({s.block_path}) fc1 ratio {r('fc1')} leaves 0 of {m} neurons")
            out.append(BlockPlan(heads=s.num_heads, qk=qk, v=v, mlp=mk))
        return out

    def _preset_plans(self, sites):
        key = preset_name(self.preset)
        p = PRESETS[key]
        a = p["arch"]
        s0 = sites[0]
        found = dict(depth=len(sites), embed_dim=s0.embed_dim, num_heads=s0.num_heads, head_dim=s0.head_dim,
                     mlp=s0.fc1.out_features if s0.fc1 is not None else None)
        if found != a:
            diff = ", ".join(f"{k}={found[k]} (preset {a[k]})" for k in a if found[k] != a[k])
            raise InvalidPassConfigError(f"snp: preset '{key}' is for another architecture: model has {diff}")
        qk, v, mlp, embed = preset_widths(key, self.granularity)
        plans = [BlockPlan(heads=s.num_heads, qk=qk[i], v=v[i], mlp=mlp[i]) for i, s in enumerate(sites)]
        return plans, embed

    # ------------------------------------------------------------------ running
    def needs_fisher(self) -> bool:
        """True when the allocation, the criterion or the token weights use Fisher scores."""
        return self.uses_fisher_allocation() or self.criterion == "fisher" or self.token_weight == "fisher"

    def fisher_scores(self, gm: GraphModule, sites: list[AttentionSite], calib: torch.Tensor,
                      ctx: Optional[PassContext] = None, progress: Optional[Detail] = None,
                      activations: Optional[dict] = None) -> Optional[list]:
        """Per-block Fisher scores on the calibration images when :meth:`needs_fisher`, else None;
        memoised in-process (:mod:`vitprune.passes.snp.cache`: the same model and views give the
        same scores whatever the budget). When computed, shown as the step ``fisher scores`` of
        ``ctx``'s display, and ``progress`` (the pass's nested bar) advances per batch.
        ``activations``: if given and the scores are computed now (not memoised), filled with the
        unpruned residual streams of that forward (:func:`block_fisher_scores`)."""
        if not self.needs_fisher():
            return None
        from .cache import fingerprint, memo
        from .sensitivity import block_fisher_scores

        cost = len(sites) * FISHER_BATCH_COST

        def compute():
            if ctx is not None:
                ctx.step("fisher scores")
            if progress is not None:
                progress.plan(cost * -(-int(calib.shape[0]) // self.batch_size))
            tick = (lambda: progress.advance(cost)) if progress is not None else None  # noqa: E731
            return block_fisher_scores(gm, sites, calib, self.batch_size, on_batch=tick, structures=structures,
                                       activations=activations)

        # the token weights alone need no masks (nor their products and gradients)
        structures = self.uses_fisher_allocation() or self.criterion == "fisher"
        return memo(fingerprint(gm, calib, "fisher", self.batch_size, structures), compute)

    def rewrite(self, gm: GraphModule, ctx: PassContext) -> GraphModule:
        with ctx.detail("snp") as progress:       # the runner records the pass's seconds
            return self._run(gm, ctx, progress)

    def _run(self, gm: GraphModule, ctx: PassContext, progress: Detail) -> GraphModule:
        if self.compensate and any(tag["kind"] == "tome" for _, tag in token_select_outputs(gm)):
            # the refit after ToMe ruins held-out agreement; measured: docs/decisions.md, "SNP after a
            # token pass (composition bug)"
            raise InvalidPassConfigError(
                "snp: the least-squares recovery after tome is not supported (it ruins held-out accuracy); "
                "put snp before tome, or pass compensate=false")
        sites = find_attention_sites(gm)
        rest = 0.0
        if self.target_gmacs is not None:
            from ...ir.flops import gmacs

            total = gmacs(gm, tuple(ctx.example_inputs[0].shape[1:]))
            rest = total - sum(_plan_macs(s, BlockPlan(s.num_heads, s.head_dim, value_head_dim(s),
                                                       s.fc1.out_features if s.fc1 else 0)) for s in sites) / 1e9
            self._check_reachable(sites, rest, total)
        calib, views = self.augmented_calibration(ctx, self.name)
        batches = -(-int(calib.shape[0]) // (self.batch_size * views))
        dry = self.allocation == "recovery" and self.needs_fisher() and self.uses_fisher_allocation()
        units = batches * BLOCK_BATCH_COST
        progress.plan(len(sites) * units * (1 + dry))
        # the Fisher forward's unpruned activations spare the pruning its own forward of the
        # original graph, when they fit (docs/decisions.md, "Exact cuts, session 11")
        acts = {} if can_take_original(gm) and _activations_fit(sites, int(calib.shape[0])) else None
        scores = self.fisher_scores(gm, sites, calib, ctx, progress, activations=acts)
        if dry and scores is not None:
            from .allocation import recovery_weighted

            # dry run at the uniform widths: how much of each block's error the refit removes
            _, probe = prune_blocks(gm, calib, self.uniform_plans(sites, rest), self, self.criterion, views,
                                    on_block=block_steps(ctx, progress, len(sites), units, "dry run: block"),
                                    original=acts)
            scores = recovery_weighted(scores, probe)
        plans, embed_keep = self.plans(sites, rest, scores)
        work, records = prune_blocks(gm, calib, plans, self, self.criterion, views, scores,
                                     on_block=block_steps(ctx, progress, len(sites), units), original=acts)
        acts = None  # free the activations before the re-export
        out = finalize(work, ctx.example_inputs)
        embed_info = None
        if embed_keep is not None and embed_keep != sites[0].embed_dim:
            from .embed import prune_embedding

            embed_info = prune_embedding(out, embed_keep)
            out = finalize(out, ctx.example_inputs)
        ctx.record(blocks=records, embed=embed_info, calibration_images=int(calib.shape[0]) // views,
                   calibration_views=views)
        return out


#: the Fisher forward's activations are kept for the pruning when they take at most this share of
#: the memory available (MemAvailable); docs/decisions.md, "Exact cuts, session 11"
ACTIVATION_MEMORY_SHARE = 0.25


def _activations_fit(sites: list[AttentionSite], rows: int) -> bool:
    """True if two fp32 residual streams ``[rows, N, C]`` per block fit in
    ``ACTIVATION_MEMORY_SHARE`` of the available memory (unknown: False)."""
    need = sum(2 * rows * s.num_tokens * s.embed_dim * 4 for s in sites)
    return need <= ACTIVATION_MEMORY_SHARE * available_memory()


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; 0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _plan_macs(s: AttentionSite, p: BlockPlan) -> float:
    return block_macs(s.num_tokens, s.embed_dim, p.heads, p.qk, p.v, p.mlp or 0)
