"""Global Fisher allocation of SNP widths (Kwon et al. 2022 §4.1)."""

import itertools

import pytest
import timm
import torch

import vitprune
from vitprune.errors import InvalidPassConfigError
from vitprune.passes.snp.snp import block_macs
from vitprune.passes.snp.allocation import allocate
from vitprune.passes.snp.engine import BlockPlan
from vitprune.passes.snp.sensitivity import BlockScores

torch.set_num_threads(1)
X = torch.randn(2, 3, 224, 224)
CAL = torch.randn(4, 3, 224, 224)


def tiny(depth=2):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=depth, num_classes=10).eval()


def _toy_macs(i, p):
    return block_macs(10, 8, p.heads, p.qk, p.v, p.mlp)


def test_allocation_matches_brute_force_on_toy_problem():
    """Every unit costs the same MACs per neuron kind, so the greedy knapsack must equal the
    cheapest feasible choice found by brute force."""
    torch.manual_seed(1)
    full = [BlockPlan(2, 4, 4, 6), BlockPlan(2, 4, 4, 6)]
    scores = [BlockScores(qk=torch.rand(2, 4).double(), v=torch.rand(2, 4).double(), head=torch.rand(2).double(),
                          fc1=torch.rand(6).double()) for _ in full]
    total = sum(_toy_macs(i, p) for i, p in enumerate(full))
    target = 0.75 * total
    plans = allocate(full, scores, _toy_macs, target)
    got = sum(_toy_macs(i, p) for i, p in enumerate(plans))
    assert got <= target

    def cost(p, s):
        return (torch.sort(s.qk, -1).values[:, : 4 - p.qk].sum() + torch.sort(s.v, -1).values[:, : 4 - p.v].sum()
                + torch.sort(s.fc1).values[: 6 - p.mlp].sum())

    best = None
    choices = [BlockPlan(2, a, b, c) for a in range(1, 5) for b in range(1, 5) for c in range(1, 7)]
    for p0, p1 in itertools.product(choices, repeat=2):
        if _toy_macs(0, p0) + _toy_macs(1, p1) <= target:
            c = float(cost(p0, scores[0]) + cost(p1, scores[1]))
            best = c if best is None else min(best, c)
    greedy = float(sum(cost(p, s) for p, s in zip(plans, scores)))
    # greedy knapsack: optimal up to the last unit taken (fractional relaxation bound)
    assert greedy <= best * 1.5 + 1e-9


def test_allocation_prefers_insensitive_blocks():
    full = [BlockPlan(2, 4, 4, 8), BlockPlan(2, 4, 4, 8)]
    lo = BlockScores(qk=torch.full((2, 4), 1e-3), v=torch.full((2, 4), 1e-3), head=torch.ones(2), fc1=torch.full((8,), 1e-3))
    hi = BlockScores(qk=torch.ones(2, 4), v=torch.ones(2, 4), head=torch.ones(2), fc1=torch.ones(8))
    plans = allocate(full, [hi, lo], _toy_macs, 0.8 * sum(_toy_macs(i, p) for i, p in enumerate(full)))
    assert plans[0] == full[0]
    assert plans[1] != full[1]


def test_allocation_round_to_and_impossible_budget():
    full = [BlockPlan(2, 16, 16, 32)]
    s = [BlockScores(qk=torch.rand(2, 16), v=torch.rand(2, 16), head=torch.rand(2), fc1=torch.rand(32))]
    plans = allocate(full, s, _toy_macs, 0.6 * _toy_macs(0, full[0]), round_to=8)
    assert plans[0].qk % 8 == 0 and plans[0].v % 8 == 0 and plans[0].mlp % 8 == 0
    with pytest.raises(InvalidPassConfigError, match="cannot reach"):
        allocate(full, s, _toy_macs, 1.0)
    with pytest.raises(InvalidPassConfigError, match="do not match"):
        allocate([BlockPlan(2, 8, 16, 32)], s, _toy_macs, 1.0)


@pytest.mark.parametrize("criterion", ["activation", "fisher"])
@pytest.mark.slow
def test_fisher_allocation_meets_gmacs_target_with_flop_counter(criterion):
    from vitprune.ir.flops import gmacs

    m = tiny(depth=3)
    base = vitprune.compile(m, [], example_inputs=X)
    g0 = base.report.gmacs_before
    target = 0.8 * g0
    c = vitprune.compile(m, [f"snp:target_gmacs={target},allocation=fisher,criterion={criterion}"], example_inputs=X,
                         calibration=CAL, progress=False)
    measured = gmacs(c)
    assert measured <= target * 1.01 and measured >= target * 0.99
    with torch.no_grad():
        assert torch.isfinite(c(X)).all()


@pytest.mark.slow
def test_fisher_allocation_ratio_spends_uniform_budget_and_ratio_zero_is_identity():
    m = tiny()
    u = vitprune.compile(m, ["snp:ratio=0.3,allocation=uniform"], example_inputs=X, calibration=CAL, progress=False)
    f = vitprune.compile(m, ["snp:ratio=0.3,allocation=fisher"], example_inputs=X, calibration=CAL, progress=False)
    assert f.report.gmacs_after <= u.report.gmacs_after * 1.001
    assert f.report.gmacs_after >= u.report.gmacs_after * 0.98
    z = vitprune.compile(m, ["snp:ratio=0,allocation=fisher,criterion=fisher"], example_inputs=X, calibration=CAL,
                         progress=False)
    with torch.no_grad():
        assert torch.equal(z(X), m(X))


def test_bad_allocation_rejected():
    with pytest.raises(InvalidPassConfigError, match="allocation='knapsack'"):
        vitprune.compile(tiny(), ["snp:ratio=0.1,allocation=knapsack"], example_inputs=X, calibration=CAL)


def test_preset_ignores_allocation():
    from vitprune.passes.snp.snp import SNP

    assert not SNP(preset="deit-t", allocation="fisher").uses_fisher_allocation()
    assert not SNP(qk=[0.1], allocation="fisher").uses_fisher_allocation()
    assert SNP(ratio=0.1, allocation="fisher").uses_fisher_allocation()


def test_recovery_weighted_scales_by_refit_error_ratio():
    from vitprune.passes.snp.allocation import recovery_weighted

    s = [BlockScores(qk=torch.ones(2, 4), v=torch.ones(2, 4), head=torch.ones(2), fc1=torch.ones(8))] * 2
    recs = [dict(attn_err_sliced=0.4, attn_err=0.1, mlp_err_sliced=0.5, mlp_err=0.5), dict()]
    out = recovery_weighted(s, recs)
    assert torch.allclose(out[0].qk, torch.full((2, 4), 0.25)) and torch.allclose(out[0].v, torch.full((2, 4), 0.25))
    assert torch.allclose(out[0].fc1, torch.ones(8))
    assert torch.equal(out[1].qk, s[1].qk) and torch.equal(out[1].fc1, s[1].fc1)  # no record: unscaled


def test_blend_endpoints_and_budget():
    from vitprune.passes.snp.allocation import blend_plans

    full = [BlockPlan(2, 8, 8, 32), BlockPlan(2, 8, 8, 32)]
    alloc = [BlockPlan(2, 8, 8, 32), BlockPlan(2, 2, 4, 8)]
    uni = [BlockPlan(2, 5, 6, 20), BlockPlan(2, 5, 6, 20)]
    target = sum(_toy_macs(i, p) for i, p in enumerate(alloc))
    a = blend_plans(full, alloc, uni, _toy_macs, target, 1.0)
    assert a == alloc
    for beta in (0.0, 0.5):
        b = blend_plans(full, alloc, uni, _toy_macs, target, beta)
        got = sum(_toy_macs(i, p) for i, p in enumerate(b))
        assert got <= target and got >= 0.9 * target
    b0 = blend_plans(full, alloc, uni, _toy_macs, target, 0.0)
    assert b0[0] == b0[1]  # uniform shape: both blocks equal
    h = blend_plans(full, alloc, uni, _toy_macs, target, 0.5)
    assert h[0].mlp > h[1].mlp  # between: still prunes block 1 more


@pytest.mark.parametrize("spec", ["allocation=recovery", "allocation=fisher,blend=0.5",
                                  "allocation=recovery,blend=0.5"])
@pytest.mark.slow
def test_recovery_and_blend_allocation_meet_gmacs_target_with_flop_counter(spec):
    from vitprune.ir.flops import gmacs

    m = tiny(depth=3)
    g0 = vitprune.compile(m, [], example_inputs=X).report.gmacs_before
    target = 0.8 * g0
    c = vitprune.compile(m, [f"snp:target_gmacs={target},{spec}"], example_inputs=X, calibration=CAL, progress=False)
    measured = gmacs(c)
    assert target * 0.99 <= measured <= target * 1.01
    with torch.no_grad():
        assert torch.isfinite(c(X)).all()


def test_bad_blend_rejected():
    with pytest.raises(InvalidPassConfigError, match="blend=1.5"):
        vitprune.compile(tiny(), ["snp:ratio=0.1,allocation=fisher,blend=1.5"], example_inputs=X, calibration=CAL)
