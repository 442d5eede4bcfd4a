"""ToMe ops and pass: against a brute-force loop reference, the unpruned model, analytic MACs,
ONNX Runtime and TVM's importer."""

from __future__ import annotations


import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitprune
from vitprune.errors import InvalidPassConfigError
from vitprune.ir.flops import gmacs
from vitprune.ir.tags import token_select_outputs
from vitprune.ops.merge import merge_packed, unpack_selection
from vitprune.ops.tome import bipartite_soft_matching, max_merge
from vitprune.passes.base import parse_pass_spec
from vitprune.passes.tokens.tome import ToMe, parse_r

from tests.lowering import onnxruntime_run, tvm_run

torch.set_num_threads(1)


def tiny_vit(depth=3, img=64, dim=48, heads=3, distilled=False, seed=0):
    torch.manual_seed(seed)
    kw = dict(class_token=True, global_pool="token")
    m = VisionTransformer(img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                          num_classes=10, reg_tokens=1 if distilled else 0, **kw)
    return m.eval()


# ------------------------------------------------------------------ brute-force reference

def reference_match_merge(metric, x, size, r, p):
    """Slow, obviously-correct ToMe step for one sample: metric [N,d], x [N,C], size [N]."""
    n = metric.shape[0]
    f = [metric[i] / metric[i].norm() for i in range(n)]
    a_ids = [i for i in range(n) if i % 2 == 0 and i >= p]
    b_ids = [j for j in range(n) if j % 2 == 1 and j >= p]
    best = {}
    for i in a_ids:
        sims = [(float(f[i] @ f[j]), j) for j in b_ids]
        best[i] = max(sims)  # (similarity, partner); random inputs: no ties
    ranked = sorted(a_ids, key=lambda i: -best[i][0])
    src = ranked[:r]
    dst = {i: best[i][1] for i in src}
    kept = [i for i in range(n) if i not in src]
    new_x, new_s = [], []
    for k in kept:
        members = [k] + [i for i in src if dst[i] == k]
        tot = sum(float(size[i]) for i in members)
        new_x.append(sum(x[i] * float(size[i]) for i in members) / tot)
        new_s.append(tot)
    return kept, src, [dst[i] for i in src], torch.stack(new_x), torch.tensor(new_s, dtype=torch.float64)


@pytest.mark.parametrize("n,p,r", [(9, 1, 3), (10, 2, 4), (17, 1, 8), (8, 0, 4), (13, 1, 0), (21, 2, 5)])
def test_matching_and_merge_equal_brute_force(n, p, r):
    g = torch.Generator().manual_seed(n * 100 + r)
    metric = torch.randn(3, n, 5, generator=g)
    x = torch.randn(3, n, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (3, n, 1), generator=g).double()
    packed = bipartite_soft_matching(metric, r, p)
    kept, src, dst = unpack_selection(packed, n - r)
    new_x, new_s = merge_packed(x, size, packed, n - r)
    for b in range(3):
        rk, rs, rd, rx, rsz = reference_match_merge(metric[b].double(), x[b], size[b, :, 0], r, p)
        assert kept[b].tolist() == rk
        assert src[b].tolist() == rs
        assert dst[b].tolist() == rd
        torch.testing.assert_close(new_x[b], rx)
        torch.testing.assert_close(new_s[b, :, 0], rsz)


def test_sizes_sum_to_token_count_and_prefix_protected():
    g = torch.Generator().manual_seed(1)
    n, p = 50, 2
    x = torch.randn(2, n, 8, generator=g)
    size = torch.ones(2, n, 1)
    ids = torch.arange(n).expand(2, n)  # track which original token sits in each slot
    for r in [12, 10, 8, 5]:
        packed = bipartite_soft_matching(torch.randn(2, x.shape[1], 6, generator=g), r, p)
        kept, src, dst = unpack_selection(packed, x.shape[1] - r)
        assert not (src < p).any() and not (dst < p).any(), "prefix tokens merged"
        assert (kept[:, :p] == torch.arange(p)).all(), "prefix tokens moved"
        x, size = merge_packed(x, size, packed, x.shape[1] - r)
        ids = torch.gather(ids, 1, kept)
        torch.testing.assert_close(size.sum(1), torch.full((2, 1), float(n)))
    assert (ids[:, :p] == torch.arange(p)).all()


def test_r_out_of_range_raises():
    with pytest.raises(ValueError, match="valid range 0..8"):
        bipartite_soft_matching(torch.randn(1, 17, 4), 9, 1)
    assert max_merge(197, 1) == 98 and max_merge(198, 2) == 98


# ------------------------------------------------------------------ schedules and config

def test_parse_r_forms():
    assert parse_r(4, 3) == [4, 4, 4]
    assert parse_r([1, 2], 4) == [1, 2, 0, 0]
    assert parse_r((4, -1.0), 3) == [8, 4, 0]
    assert sum(parse_r((6, 1.0), 5)) == 30


@pytest.mark.parametrize("spec,msg", [
    ("tome", "exactly one of r"),
    ("tome:r=4,target_gmacs=0.9", "exactly one of r"),
    ("tome:r=-1", "non-negative"),
    ("tome:r=4,inflection=2", r"\[-1, 1\]"),
    ("tome:target_gmacs=-3", "positive"),
])
def test_bad_config_rejected_before_graph(spec, msg):
    with pytest.raises(InvalidPassConfigError, match=msg):
        parse_pass_spec(spec)


def test_unreachable_budget_names_range():
    m = tiny_vit()
    with pytest.raises(InvalidPassConfigError, match="valid range"):
        vitprune.compile(m, ["tome:target_gmacs=0.0001"], example_inputs=torch.randn(2, 3, 64, 64))


# ------------------------------------------------------------------ the pass on graphs

def test_r0_reproduces_original_outputs():
    m = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    c = vitprune.compile(m, [ToMe(r=[0, 0, 0])], example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), atol=0, rtol=0)


def test_sizes_of_one_and_no_merge_keep_outputs_with_prop_attn():
    # r only in the last block: earlier blocks are untouched, so the CLS logits must still match
    # the model's block-by-block output until the merge; after a merge in block 2 of 3 only the
    # last block sees log(size). Compare with an eager re-implementation of that last block.
    m = tiny_vit(depth=2)
    x = torch.randn(3, 3, 64, 64)
    c = vitprune.compile(m, [ToMe(r=[4, 0])], example_inputs=x)
    with torch.no_grad():
        t = m.patch_embed(x)
        t = m._pos_embed(t)
        blk = m.blocks[0]
        t = t + blk.attn(blk.norm1(t))
        # reference: eager matching on head-mean keys of block 0
        qkv = blk.attn.qkv(blk.norm1(m._pos_embed(m.patch_embed(x)))).reshape(3, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
        k = qkv[1]
        packed = bipartite_soft_matching(k.mean(1), 4, 1)
        t, size = merge_packed(t, torch.ones_like(t[..., :1]), packed, 17 - 4)
        t = t + blk.mlp(blk.norm2(t))
        b1 = m.blocks[1]
        h = b1.norm1(t)
        qkv = b1.attn.qkv(h).reshape(3, 13, 3, 3, 16).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q * b1.attn.scale) @ k.transpose(-2, -1) + size.log()[..., 0][:, None, None, :]
        a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(3, 13, 48)
        t = t + b1.attn.proj(a)
        t = t + b1.mlp(b1.norm2(t))
        ref = m.forward_head(m.norm(t))
        torch.testing.assert_close(c(x), ref, atol=1e-5, rtol=1e-5)


def test_batch_independence_and_prefix_kept_distilled():
    m = tiny_vit(distilled=True)  # one register token: two prefix tokens (CLS at 0, reg at 1)
    x = torch.randn(3, 3, 64, 64)
    c = vitprune.compile(m, ["tome:r=3"], example_inputs=x)
    assert c.report.passes[0]["tokens"] == [18, 15, 12, 9]
    with torch.no_grad():
        full = c(x)
        for i in range(3):
            torch.testing.assert_close(c(x[i:i + 1]), full[i:i + 1], atol=1e-5, rtol=1e-5)
    # the tagged selection values: prefix tokens always kept in front
    values = {}

    class Grab(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    outs = token_select_outputs(c.graph_module)
    assert [t["block"] for _, t in outs] == [0, 1, 2]
    with torch.no_grad():
        Grab(c.graph_module).run(x)
    for node, tag in outs:
        kept, src, dst = unpack_selection(values[node], tag["n_keep"])
        assert (kept[:, :2] == torch.tensor([0, 1])).all()
        assert (src >= 2).all() and (dst >= 2).all()


def analytic_tome_macs(depth, n, p, d, heads, mlp, sched, img_tokens, num_classes, patch_macs):
    """Independent MAC count of a ToMe ViT written from the block formula in ALGORITHMS.md §1d."""
    hd = d // heads
    total = patch_macs + d * num_classes
    for r in sched:
        total += 4 * n * d * d + 2 * n * n * d                         # qkv, proj, qk^T, pv
        if r:
            total += ((n + 1) // 2) * (n // 2) * hd                    # A @ B^T cosine scores
            total += (n - r) * r * (d + 1)                             # one-hot merge matmuls
        n -= r
        total += 2 * n * d * mlp
    return total / 1e9


@pytest.mark.slow
def test_gmacs_match_analytic_count_and_target():
    m = tiny_vit(depth=4, img=96)  # 36 patches + CLS
    x = torch.randn(2, 3, 96, 96)
    c = vitprune.compile(m, ["tome:r=5;4;3;2"], example_inputs=x)
    want = analytic_tome_macs(4, 37, 1, 48, 3, 192, [5, 4, 3, 2], 36, 10, 36 * 48 * 3 * 256)
    assert abs(c.report.gmacs_after - want) <= 1e-6 + 1e-3 * want
    base = c.report.gmacs_before
    target = 0.7 * base
    c2 = vitprune.compile(m, [f"tome:target_gmacs={target}"], example_inputs=x)
    assert abs(gmacs(c2.graph_module, (3, 96, 96)) - target) <= 0.01 * target


@pytest.mark.slow
def test_exports_to_onnx_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    m = tiny_vit(depth=3)
    x = torch.randn(2, 3, 64, 64)
    c = vitprune.compile(m, ["tome:r=4"], example_inputs=x)
    out, ops = onnxruntime_run(c.graph_module, x, str(tmp_path / "tome.onnx"))
    with torch.no_grad():
        ref = c(x)
    assert float((torch.from_numpy(out) - ref).abs().max()) <= 1e-4
    assert not ops & {"ScatterElements", "ScatterND"}, ops


@pytest.mark.slow
def test_tvm_imports_and_runs():
    pytest.importorskip("tvm")
    m = tiny_vit(depth=2, dim=24)
    x = torch.randn(1, 3, 64, 64)
    c = vitprune.compile(m, ["tome:r=4"], example_inputs=x)
    out = tvm_run(c.graph_module, x)
    with torch.no_grad():
        ref = c(x)
    assert float((torch.from_numpy(out) - ref).abs().max()) <= 1e-4
