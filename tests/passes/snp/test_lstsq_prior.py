"""Least-squares recovery shrunk towards the original weights, cross-validated ridge, weighted
statistics: checked against direct dense solutions."""

import torch

from vitprune.passes.snp.lstsq import LinearStats, cv_ridge, reconstruction_error, refit


def _data(seed=0, n=400, m=6, d=3, noise=0.1):
    torch.manual_seed(seed)
    x = torch.randn(n, m, dtype=torch.float64)
    w = torch.randn(d, m, dtype=torch.float64)
    t = x @ w.T + 0.2 + noise * torch.randn(n, d, dtype=torch.float64)
    return x, w, t


def test_refit_with_prior_matches_augmented_lstsq():
    x, w, t = _data()
    st = LinearStats.zeros(6, 3)
    st.add(x, t)
    keep = [0, 1, 4]
    prior = torch.randn(3, 3, dtype=torch.float64)
    ridge = 0.5
    wf, bf = refit(st, keep, ridge, prior)
    lam = ridge * float((x[:, keep] ** 2).sum(0).mean())
    # min ||[X 1][W; b] - T||^2 + lam ||W - P||^2 as one stacked least-squares problem
    xa = torch.cat([x[:, keep], torch.ones(400, 1, dtype=torch.float64)], 1)
    reg = torch.cat([lam ** 0.5 * torch.eye(3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(torch.cat([xa, reg]), torch.cat([t, lam ** 0.5 * prior.T])).solution
    torch.testing.assert_close(wf.double(), sol[:-1].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bf.double(), sol[-1], atol=1e-5, rtol=1e-5)
    # a huge ridge keeps the prior
    wp, _ = refit(st, keep, 1e9, prior)
    torch.testing.assert_close(wp.double(), prior, atol=1e-4, rtol=1e-4)


def test_weighted_stats_equal_row_scaling():
    x, w, t = _data(1, n=50)
    wt = torch.rand(50, dtype=torch.float64) + 0.1
    a = LinearStats.zeros(6, 3)
    a.add(x, t, wt)
    xa = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1) * wt.sqrt()[:, None]
    torch.testing.assert_close(a.A, xa.T @ xa)
    torch.testing.assert_close(a.C, xa.T @ (t * wt.sqrt()[:, None]))
    b = LinearStats.zeros(6, 3)
    b.add(x[:20], t[:20], wt[:20])
    c = LinearStats.zeros(6, 3)
    c.add(x[20:], t[20:], wt[20:])
    s = b + c
    torch.testing.assert_close(s.A, a.A)
    assert s.count == 50


def test_cv_ridge_small_for_clean_data_large_for_noise():
    x, w, t = _data(2, noise=0.01)
    folds = [LinearStats.zeros(6, 3), LinearStats.zeros(6, 3)]
    folds[0].add(x[:200], t[:200])
    folds[1].add(x[200:], t[200:])
    assert cv_ridge(folds, list(range(6)), None) == 1e-3
    # pure-noise targets, prior 0: shrinking to the prior generalises best
    torch.manual_seed(3)
    noise = torch.randn(40, 3, dtype=torch.float64)
    xs = torch.randn(40, 6, dtype=torch.float64)
    f2 = [LinearStats.zeros(6, 3), LinearStats.zeros(6, 3)]
    f2[0].add(xs[:20], noise[:20])
    f2[1].add(xs[20:], noise[20:])
    assert cv_ridge(f2, list(range(6)), torch.zeros(3, 6, dtype=torch.float64)) >= 1.0


def test_refit_scales_matches_dense_lstsq():
    from vitprune.passes.snp.lstsq import refit_scales

    x, w, t = _data(4, n=300)
    st = LinearStats.zeros(6, 3)
    st.add(x, t)
    keep = [1, 2, 5]
    ws, bs = refit_scales(st, keep, w[:, keep], ridge=0.0)
    # unknowns (m_1..m_S, b): design columns x_j * w_j (flattened over outputs) and the bias
    cols = [(x[:, j:j + 1] * w[:, j][None]).reshape(-1) for j in keep]
    eye = torch.eye(3, dtype=torch.float64)
    bias_cols = [eye[c].repeat(300) for c in range(3)]
    design = torch.stack(cols + bias_cols, 1)
    sol = torch.linalg.lstsq(design, t.reshape(-1)).solution
    torch.testing.assert_close(ws.double(), w[:, keep] * sol[:3][None], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bs.double(), sol[3:], atol=1e-5, rtol=1e-5)
    assert reconstruction_error(st, keep, ws, bs) <= reconstruction_error(st, keep, w[:, keep], None) + 1e-12
