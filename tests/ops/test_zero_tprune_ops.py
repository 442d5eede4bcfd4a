"""Zero-TPrune ops against independent references: networkx PageRank / the leading left
eigenvector (WPR), brute-force Python loops (EIR/VHF, selection, S-stage), and hypothesis
property tests over random attention matrices."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitprune.ops.head_filter import eir_vhf, head_variance
from vitprune.ops.similarity import key_features, partition_sizes, s_stage
from vitprune.ops.token_select import gather_tokens, index_mask, order_key, topk_keep
from vitprune.ops.wpr import wpr
from vitprune.ops.zero_tprune_layer import cls_keep, random_keep, select_tokens

torch.set_num_threads(1)
SETTINGS = dict(max_examples=40, deadline=None)


def random_attention(b, h, n, seed, temp=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, n, n, generator=g) * temp, dim=-1)


# ------------------------------------------------------------------ WPR

@pytest.mark.parametrize("n,seed", [(5, 0), (12, 1), (30, 2)])
def test_wpr_converges_to_networkx_pagerank_alpha_1(n, seed):
    a = random_attention(1, 1, n, seed, temp=2.0)[0, 0].double()
    g = nx.DiGraph()
    for i in range(n):
        for j in range(n):
            g.add_edge(i, j, weight=float(a[i, j]))
    pr = nx.pagerank(g, alpha=1.0, weight="weight", tol=1e-12, max_iter=10_000)
    ref = torch.tensor([pr[i] for i in range(n)], dtype=torch.float64)
    s = wpr(a[None, None].float(), iters=200, cls_init=False)[0, 0].double()
    assert torch.allclose(s, ref, atol=1e-6), (s, ref)


def test_wpr_equals_leading_left_eigenvector_and_cls_init_does_not_matter_at_convergence():
    a = random_attention(2, 3, 17, 7, temp=3.0)
    s_uni = wpr(a, iters=300, cls_init=False)
    s_cls = wpr(a, iters=300, cls_init=True)
    for b in range(2):
        for h in range(3):
            m = a[b, h].double().numpy()
            w, v = np.linalg.eig(m.T)
            lead = np.real(v[:, np.argmax(np.real(w))])
            lead = lead / lead.sum()
            assert np.allclose(s_uni[b, h].double().numpy(), lead, rtol=1e-4, atol=1e-6)
            # the CLS start only changes the total mass (sum of the start vector)
            total = (17 - 1 + math.sqrt(17)) / 17
            assert np.allclose(s_cls[b, h].double().numpy() / total, lead, rtol=1e-4, atol=1e-6)


def test_wpr_one_iteration_formula_and_no_underflow():
    a = random_attention(1, 2, 9, 3)
    n = 9
    s1 = wpr(a, iters=1, cls_init=True)
    s0 = torch.full((n,), 1.0 / n)
    s0[0] *= math.sqrt(n)
    ref = torch.einsum("hji,j->hi", a[0], s0)
    assert torch.allclose(s1[0], ref, atol=1e-7)
    s50 = wpr(a, iters=50, cls_init=False)
    assert torch.allclose(s50.sum(-1), torch.ones(1, 2), atol=1e-5)        # no 1/N per step
    assert wpr(a.half(), iters=3, cls_init=False).dtype == torch.float32   # fp32 whatever the input


@settings(**SETTINGS)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 24), st.integers(0, 10_000), st.integers(0, 12),
       st.floats(0.1, 5.0))
def test_wpr_properties(b, h, n, seed, iters, temp):
    a = random_attention(b, h, n, seed, temp)
    s = wpr(a, iters=iters, cls_init=False)
    assert s.shape == (b, h, n)
    assert (s >= 0).all()
    assert torch.allclose(s.sum(-1), torch.ones(b, h), atol=1e-5)
    # per-sample: WPR of one sample alone equals its slice of the batch
    assert torch.allclose(wpr(a[-1:], iters=iters, cls_init=True), wpr(a, iters=iters, cls_init=True)[-1:], atol=1e-6)


@settings(**SETTINGS)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(3, 24), st.integers(0, 10_000), st.integers(0, 7),
       st.booleans(), st.integers(1, 2), st.data())
def test_masked_wpr_is_wpr_of_the_renormalised_subgraph(b, h, n, seed, iters, cls_init, num_init, data):
    a = random_attention(b, h, n, seed, temp=2.0)
    k = data.draw(st.integers(max(num_init, 1), n))
    kept = torch.stack([torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(seed + i))[:k]).values
                        for i in range(b)])
    mask = torch.zeros(b, n)
    for bi in range(b):
        mask[bi, kept[bi]] = 1.0
    s = wpr(a, iters, cls_init, num_init, mask=mask)
    for bi in range(b):                                 # reference: index the sub-graph, renormalise its rows
        sub = a[bi][:, kept[bi]][:, :, kept[bi]]
        ref = wpr((sub / sub.sum(-1, keepdim=True))[None], iters, cls_init, num_init)[0]
        assert torch.allclose(s[bi][:, kept[bi]], ref, rtol=1e-5, atol=1e-7)
        assert bool((s[bi][:, mask[bi] == 0] == 0).all())


# ------------------------------------------------------------------ EIR / VHF

def eir_vhf_reference(s, vmin, vmax, var_norm):
    b, h, n = s.shape
    out = torch.zeros(b, n, dtype=torch.float64)
    for bi in range(b):
        keep = []
        for hi in range(h):
            v = s[bi, hi].double()
            if var_norm == "mean1":
                t = v / v.mean()
                var = float(((t - t.mean()) ** 2).mean())
            elif var_norm == "sum_sq_dev":
                p = v / v.sum()
                var = float(sum((float(pi) - 1.0 / n) ** 2 for pi in p))
            else:
                var = float(((v - v.mean()) ** 2).mean())
            if vmin <= var <= vmax:
                keep.append(hi)
        keep = keep or list(range(h))
        for i in range(n):
            out[bi, i] = math.sqrt(sum(float(s[bi, hi, i]) ** 2 for hi in keep) / len(keep))
    return out


@settings(**SETTINGS)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(2, 20), st.integers(0, 10_000),
       st.sampled_from(["mean1", "sum_sq_dev", "raw"]), st.floats(0.0, 0.5), st.floats(0.0, 2.0),
       st.floats(0.2, 6.0))
def test_eir_vhf_matches_loop_reference(b, h, n, seed, var_norm, vmin, width, temp):
    s = wpr(random_attention(b, h, n, seed, temp), iters=2, cls_init=True)
    vmax = vmin + width
    got = eir_vhf(s, vmin, vmax, var_norm)
    ref = eir_vhf_reference(s, vmin, vmax, var_norm)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-7)


@settings(**SETTINGS)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(3, 20), st.integers(0, 10_000),
       st.sampled_from(["mean1", "sum_sq_dev", "raw"]), st.floats(0.0, 0.5), st.floats(0.0, 2.0), st.data())
def test_masked_eir_vhf_is_eir_vhf_of_the_marked_tokens(b, h, n, seed, var_norm, vmin, width, data):
    s = wpr(random_attention(b, h, n, seed, 2.0), iters=2, cls_init=True)
    k = data.draw(st.integers(2, n))
    kept = torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]).values
    mask = torch.zeros(b, n)
    mask[:, kept] = 1.0
    got = eir_vhf(s * mask.unsqueeze(1), vmin, vmin + width, var_norm, mask=mask)[:, kept]
    ref = eir_vhf_reference(s[:, :, kept], vmin, vmin + width, var_norm)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-7)


def test_vhf_fallback_and_variance_scales():
    s = wpr(random_attention(2, 3, 11, 5, temp=2.0), iters=5, cls_init=False)
    rms = torch.sqrt((s ** 2).mean(1))
    # a band nothing passes falls back to every head = plain EIR
    imp, mask = eir_vhf(s, 1e6, 2e6, "mean1", return_mask=True)
    assert torch.allclose(imp, rms) and bool((mask == 1).all())
    assert torch.allclose(eir_vhf(s, use_vhf=False), rms)
    # scales: mean1 = N^2 * raw for scores summing to one; sum_sq_dev = N * raw
    raw = head_variance(s, "raw")
    assert torch.allclose(head_variance(s, "mean1"), raw * 11 ** 2, rtol=1e-4)
    assert torch.allclose(head_variance(s, "sum_sq_dev"), raw * 11, rtol=1e-4)
    uniform = torch.full((1, 2, 11), 1.0 / 11)
    assert torch.allclose(head_variance(uniform, "mean1"), torch.zeros(1, 2), atol=1e-10)
    one_hot = torch.zeros(1, 1, 11)
    one_hot[..., 3] = 1
    assert torch.allclose(head_variance(one_hot, "mean1"), torch.tensor([[10.0]]))


# ------------------------------------------------------------------ selection

def topk_reference(scores, keep, p):
    b, n = scores.shape
    out = []
    for bi in range(b):
        order = sorted(range(p, n), key=lambda i: (-float(scores[bi, i]), i))
        out.append(sorted(list(range(p)) + order[: keep - p]))
    return torch.tensor(out, dtype=torch.int64)


@settings(**SETTINGS)
@given(st.integers(1, 4), st.integers(1, 30), st.integers(0, 2), st.integers(0, 10_000), st.data(),
       st.booleans())
def test_topk_keep_matches_reference_with_ties(b, n, p, seed, data, ties):
    p = min(p, n)
    keep = data.draw(st.integers(p, n))
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (b, n), generator=g).float() if ties else torch.randn(b, n, generator=g)
    idx = topk_keep(scores, keep, p)
    assert torch.equal(idx, topk_reference(scores, keep, p))


@given(st.integers(1, 3), st.integers(1, 40), st.integers(0, 10_000))
@settings(**SETTINGS)
def test_index_mask_matches_scatter(b, n, seed):
    """The scatter-free mask equals ``scatter`` of ones at distinct indices (r from 0 to N)."""
    g = torch.Generator().manual_seed(seed)
    r = int(torch.randint(0, n + 1, (1,), generator=g))
    idx = torch.stack([torch.randperm(n, generator=g)[:r] for _ in range(b)])
    ref = torch.zeros(b, n).scatter_(1, idx, 1.0)
    assert torch.equal(index_mask(idx, n), ref)


def test_order_key_orders_like_score_then_index_on_hard_values():
    """Ties, +0/-0, subnormals, float32 neighbours, huge and negative scores: sorting the keys
    gives the order of ``(-score, index)`` (the brute-force reference) and no two keys tie."""
    tiny = float(np.nextafter(np.float32(0), np.float32(1)))                  # smallest subnormal
    one_up = float(np.nextafter(np.float32(1), np.float32(2)))
    hard = [0.0, -0.0, tiny, -tiny, 2 * tiny, 1.0, one_up, 1.0, -1.0, 3.4e38, -3.4e38, 1e-38, 1e-38,
            0.5, 0.5, 0.5, 7.0, -0.0, 0.0, tiny]
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        perm = torch.randperm(len(hard), generator=g)
        scores = torch.tensor([hard[i] for i in perm], dtype=torch.float32)[None]
        key = order_key(scores)
        got = torch.sort(key, -1, descending=True).indices[0].tolist()
        ref = sorted(range(len(hard)), key=lambda i: (-float(scores[0, i]), i))
        assert got == ref
        assert len(set(key[0].tolist())) == len(hard)


def test_gathers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, generator=g)
    idx = torch.tensor([[0, 2, 6], [0, 1, 3]])
    assert torch.equal(gather_tokens(x, idx)[1], x[1, [0, 1, 3]])
    assert torch.equal(gather_tokens(x[..., 0], idx)[0], x[0, [0, 2, 6], 0])
    # non-contiguous tokens (a permuted view, as q/k/v slices are) against advanced indexing
    xt = torch.randn(2, 5, 7, generator=g).transpose(1, 2)
    assert torch.equal(gather_tokens(xt, idx), xt[torch.arange(2).unsqueeze(1), idx])


# ------------------------------------------------------------------ S-stage

def s_stage_reference(feats, imp, r_s, p):
    """Sequential-U partition by importance, cosine to the important half, drop most redundant."""
    b, n, _ = feats.shape
    kept_all = []
    for bi in range(b):
        f = [feats[bi, i] / feats[bi, i].norm() for i in range(n)]
        order = sorted(range(p, n), key=lambda i: (-float(imp[bi, i]), i))
        nb = (len(order) + 1) // 2
        bset, aset = order[:nb], order[nb:]
        best = {i: max(float(f[i] @ f[j]) for j in bset) for i in aset}
        drop = sorted(aset, key=lambda i: (-best[i], i))[:r_s]
        kept_all.append([i for i in range(n) if i not in drop])
    return torch.tensor(kept_all, dtype=torch.int64)


@settings(**SETTINGS)
@given(st.integers(1, 3), st.integers(3, 25), st.integers(0, 2), st.integers(0, 10_000), st.data())
def test_s_stage_matches_brute_force(b, n, p, seed, data):
    p = min(p, n - 1)
    nb, na = partition_sizes(n, p)
    r_s = data.draw(st.integers(0, na))
    g = torch.Generator().manual_seed(seed)
    feats = key_features(torch.randn(b, n, 6, generator=g))
    imp = torch.rand(b, n, generator=g)
    kept, removed, target = s_stage(feats, imp, r_s, p, return_match=True)
    assert torch.equal(kept, s_stage_reference(feats, imp, r_s, p))
    assert kept.shape == (b, n - r_s)
    assert torch.equal(kept[:, :p], torch.arange(p).expand(b, p))        # prefix never enters
    for bi in range(b):
        assert set(kept[bi].tolist()) | set(removed[bi].tolist()) == set(range(n))
        assert set(target[bi].tolist()) <= set(kept[bi].tolist())


def test_s_stage_removes_exact_duplicates_first():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 11, 4, generator=g)
    k[:, :, 9] = k[:, :, 4]                   # token 9 duplicates token 4
    imp = torch.linspace(1, 0, 11)[None]      # 4 is important (B half), 9 is not (A half)
    kept = s_stage(key_features(k, "concat"), imp, 1, 1)
    assert 9 not in kept[0].tolist() and kept.shape == (1, 10)
    with pytest.raises(ValueError, match="r_S"):
        s_stage(key_features(k), imp, 6, 1)   # |A_set| = 5


# ------------------------------------------------------------------ the whole layer

@settings(**SETTINGS)
@given(st.integers(2, 3), st.integers(1, 3), st.integers(4, 20), st.integers(0, 2), st.integers(0, 10_000),
       st.data(), st.sampled_from(["wpr", "cls", "random"]))
def test_select_tokens_properties(b, h, n, p, seed, data, importance):
    nb, na = partition_sizes(n, p)
    r_s = data.draw(st.integers(0, na)) if importance == "wpr" else 0
    n_keep = data.draw(st.integers(p + 1, n - r_s))
    attn = random_attention(b, h, n, seed, temp=2.0)
    keys = torch.randn(b, h, n, 4, generator=torch.Generator().manual_seed(seed + 1))
    if importance == "wpr":
        def select(a, k):
            return select_tokens(a, k, n_after_s=n - r_s, n_keep=n_keep, num_prefix=p, iters=3)
    elif importance == "cls":
        def select(a, k):
            return cls_keep(a, n_keep, p)
    else:
        def select(a, k):
            return random_keep(k[:, 0], n_keep, p, seed=3)
    idx = select(attn, keys)
    assert idx.shape == (b, n_keep) and idx.dtype == torch.int64
    assert torch.equal(idx[:, :p], torch.arange(p).expand(b, p))
    assert bool((idx[:, 1:] > idx[:, :-1]).all())                        # ascending, distinct
    for i in range(b):                                                   # each sample alone
        assert torch.equal(select(attn[i:i + 1], keys[i:i + 1]), idx[i:i + 1])


def select_tokens_reference(attn, keys, n_after_s, n_keep, p, iters):
    """The layer as ALGORITHMS.md §1b writes it, one sample at a time from the loop references:
    I' (1 WPR iteration) -> S-stage -> WPR on the indexed, renormalised sub-graph -> top-k."""
    out = []
    for bi in range(attn.shape[0]):
        a, k = attn[bi:bi + 1], keys[bi:bi + 1]
        pre = eir_vhf_reference(wpr(a, 1, True, max(p, 1)), 0.01, 0.7, "mean1")
        kept = s_stage_reference(key_features(k), pre, attn.shape[-1] - n_after_s, p)[0]
        sub = a[0][:, kept][:, :, kept]
        imp = eir_vhf_reference(wpr((sub / sub.sum(-1, keepdim=True))[None], iters, True, max(p, 1)),
                                0.01, 0.7, "mean1")
        out.append(kept[topk_reference(imp, n_keep, p)[0]])
    return torch.stack(out)


@pytest.mark.parametrize("seed", range(12))
def test_select_tokens_matches_the_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, p = [(13, 1), (24, 0), (31, 2), (50, 1)][seed % 4]
    nb, na = partition_sizes(n, p)
    r_s = 1 + seed % na
    n_keep = p + 1 + (seed * 7) % (n - r_s - p)
    attn = random_attention(2, 3, n, seed, temp=2.0)
    keys = torch.randn(2, 3, n, 4, generator=g)
    if seed % 3 == 0:                               # duplicate tokens: tied scores and similarities
        attn[:, :, :, 5] = attn[:, :, :, 2]
        attn = attn / attn.sum(-1, keepdim=True)
        keys[:, :, 7] = keys[:, :, 3]
    got = select_tokens(attn, keys, n_after_s=n - r_s, n_keep=n_keep, num_prefix=p, iters=4)
    assert torch.equal(got, select_tokens_reference(attn, keys, n - r_s, n_keep, p, 4))


def test_select_tokens_wpr_without_s_stage_is_topk_of_eir():
    attn = random_attention(2, 3, 13, 11, temp=2.0)
    keys = torch.randn(2, 3, 13, 4)
    idx = select_tokens(attn, keys, n_after_s=13, n_keep=8, num_prefix=1, iters=7, cls_init=True)
    imp = eir_vhf(wpr(attn, 7, True), 0.01, 0.7, "mean1")
    assert torch.equal(idx, topk_reference(imp, 8, 1))


# ------------------------------------------------------------------ merge variant

@settings(**SETTINGS)
@given(st.integers(1, 3), st.integers(3, 16), st.integers(0, 10_000), st.data())
def test_merge_into_matches_loop_reference(b, n, seed, data):
    from vitprune.ops.merge import merge_tokens

    r = data.draw(st.integers(0, n // 2))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (b, n, 1), generator=g).double()
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    src = perm[:, :r]
    dst = perm[:, r:][:, torch.randint(0, n - r, (r,), generator=g)] if r else perm[:, :0]
    xm, sm = merge_tokens(x, size, src, dst)
    for bi in range(b):
        for j in range(n):
            members = [j] + [int(src[bi, k]) for k in range(r) if int(dst[bi, k]) == j]
            tot = sum(float(size[bi, i]) for i in members)
            want = sum(x[bi, i] * float(size[bi, i]) for i in members) / tot
            assert abs(float(sm[bi, j]) - tot) < 1e-9
            assert torch.allclose(xm[bi, j], want)


def test_select_tokens_merge_pairs_are_s_stage_pairs():
    attn = random_attention(2, 3, 15, 4, temp=2.0)
    keys = torch.randn(2, 3, 15, 4, generator=torch.Generator().manual_seed(9))
    kept, src, dst = select_tokens(attn, keys, n_after_s=11, n_keep=8, num_prefix=1, return_merge=True)
    assert torch.equal(kept, select_tokens(attn, keys, n_after_s=11, n_keep=8, num_prefix=1))
    assert src.shape == dst.shape == (2, 4)
    for bi in range(2):
        assert not set(src[bi].tolist()) & set(kept[bi].tolist())        # merged tokens are gone
        assert 0 not in src[bi].tolist()                                  # CLS is never merged away
