"""SNP scores and least-squares recovery against brute-force references."""

import itertools

import pytest
import torch

from vitprune.passes.snp.lstsq import LinearStats, reconstruction_error, refit
from vitprune.passes.snp.scores import qk_pair_scores, redundancy_scores, select_gamma, top_indices


def _cos_f(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("N, d", [(9, 5), (4, 5)])   # (4, 5): fewer tokens than dims, the QR fallback
def test_pair_score_equals_bruteforce_frobenius_cosine(N, d):
    torch.manual_seed(0)
    B, H = 2, 2
    q, k = torch.randn(B, H, N, d, dtype=torch.float64), torch.randn(B, H, N, d, dtype=torch.float64)
    for gamma in (1, 3, min(N, d)):
        got = qk_pair_scores(q, k, gamma=gamma)
        for b, h in itertools.product(range(B), range(H)):
            s = q[b, h] @ k[b, h].T  # N x N logits
            u, sig, vh = torch.linalg.svd(s)
            for n in range(d):
                rank1 = torch.outer(q[b, h, :, n], k[b, h, :, n])
                ref = sum(abs(_cos_f(sig[j] * torch.outer(u[:, j], vh[j]), rank1)) for j in range(gamma))
                assert abs(float(got[b, h, n]) - ref) < 1e-9


def test_gamma_selection_energy_rule():
    sig = torch.tensor([3.0, 2.0, 1.0, 0.5])
    e = sig ** 2 / (sig ** 2).sum()  # 0.6545, 0.2909, 0.0727, 0.018
    assert int(select_gamma(sig, 0.9)) == 2
    assert int(select_gamma(sig, 0.95)) == 3
    assert int(select_gamma(sig, 0.9, cap=1)) == 1
    assert float(e[:2].sum()) >= 0.9


def test_redundancy_scores_bruteforce():
    torch.manual_seed(1)
    w = torch.randn(3, 4, 6)
    w[1, 2] = 0  # dead neuron
    got = redundancy_scores(w)
    rows = w.reshape(-1, 6)
    for i in range(rows.shape[0]):
        if rows[i].norm() == 0:
            assert got.reshape(-1)[i] == 0
            continue
        ref = 0.0
        for j in range(rows.shape[0]):
            if j == i or rows[j].norm() == 0:
                ref += 1.0 if j != i else 0.0
                continue
            ref += 1 - abs(float(rows[i] @ rows[j] / (rows[i].norm() * rows[j].norm())))
        assert abs(float(got.reshape(-1)[i]) - ref) < 1e-5


def test_top_indices_ties_lowest_index():
    assert top_indices(torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0]), 2) == [1, 2]


def test_refit_matches_lstsq_and_error_formula():
    torch.manual_seed(2)
    x = torch.randn(200, 7, dtype=torch.float64)
    w = torch.randn(3, 7, dtype=torch.float64)
    t = x @ w.T + 0.5 + 0.1 * torch.randn(200, 3, dtype=torch.float64)
    st = LinearStats.zeros(7, 3)
    st.add(x[:120], t[:120])
    st.add(x[120:], t[120:])
    keep = [0, 2, 3, 6]
    wf, bf = refit(st, keep, ridge=0.0)
    xa = torch.cat([x[:, keep], torch.ones(200, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(xa, t).solution
    assert torch.allclose(wf.double(), sol[:-1].T, atol=1e-4)
    assert torch.allclose(bf.double(), sol[-1], atol=1e-4)
    # error formula vs direct computation
    pred = x[:, keep] @ w[:, keep].T
    direct = float(((pred - t) ** 2).sum() / (t ** 2).sum())
    assert abs(reconstruction_error(st, keep, w[:, keep], None) - direct) < 1e-9
    # the refit is the least-squares optimum: never worse than slicing
    assert reconstruction_error(st, keep, wf, bf) <= reconstruction_error(st, keep, w[:, keep], None)


@pytest.mark.parametrize("m, weighted", [(7, True), (300, False), (300, True)])  # 300 > 2 blocks: blocked Gram
def test_stats_equal_the_products_of_the_augmented_matrix(m, weighted):
    """``A``, ``C`` and ``tt`` against ``[X, 1]^T [X, 1]`` formed explicitly (weights: rows scaled by
    ``sqrt(w)``), over two batches of fp32 inputs."""
    torch.manual_seed(4)
    x, t = torch.randn(2, 150, m), torch.randn(2, 150, 5)
    w = torch.rand(2, 150) if weighted else None
    st = LinearStats.zeros(m, 5)
    for i in range(2):
        st.add(x[i], t[i], None if w is None else w[i])
    xa = torch.cat([x.reshape(-1, m), torch.ones(300, 1)], 1).double()
    tt = t.reshape(-1, 5).double()
    if weighted:
        sw = w.reshape(-1, 1).double().sqrt()
        xa, tt = xa * sw, tt * sw
    torch.testing.assert_close(st.A, xa.T @ xa, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(st.C, xa.T @ tt, rtol=1e-5, atol=1e-3)
    assert st.count == 300 and abs(st.tt - float((tt ** 2).sum())) < 1e-3 * st.tt


def test_greedy_lsq_single_removal_is_bruteforce_optimal():
    from vitprune.passes.snp.lstsq import greedy_lsq_select

    torch.manual_seed(3)
    x = torch.randn(300, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    t = x @ torch.randn(6, 2, dtype=torch.float64) + 0.3 * torch.randn(300, 2, dtype=torch.float64)
    st = LinearStats.zeros(6, 2)
    st.add(x, t)
    (kept,) = greedy_lsq_select(st, [list(range(6))], 5, ridge=0.0)
    errs = {}
    for j in range(6):
        keep = [i for i in range(6) if i != j]
        w, b = refit(st, keep, ridge=0.0)
        errs[j] = reconstruction_error(st, keep, w.double(), b.double())
    best = min(errs, key=errs.get)
    assert kept == [i for i in range(6) if i != best]
