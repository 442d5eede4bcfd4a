"""ZeroTPrune pass: identity at keep=1, batch independence, protected prefix tokens (CLS and
distillation token), GMACs against an independent analytic count, budgets, export to ONNX
Runtime and TVM, bad input rejected before any graph is touched."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import vitprune
from vitprune.errors import InvalidPassConfigError
from vitprune.ir.flops import gmacs
from vitprune.ir.capture import capture
from vitprune.passes.base import Pass, PassContext, parse_pass_spec
from vitprune.passes.tokens.zero_tprune import PRESETS, ZeroTPrune, kept_token_indices

from tests.lowering import onnxruntime_run, tvm_run

torch.set_num_threads(1)


def tiny_vit(depth=4, img=64, dim=48, heads=3, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                             num_classes=10).eval()


def tiny_deit_distilled(depth=4, img=64, dim=48, heads=3, seed=0):
    torch.manual_seed(seed)
    return VisionTransformerDistilled(img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                                      num_classes=10).eval()


def test_keep_all_reproduces_original_outputs_exactly():
    m = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    c = vitprune.compile(m, [ZeroTPrune(prune_blocks=[0, 1, 2], keep=[1.0])], example_inputs=x)
    assert c.report.passes[0]["tokens_per_block"] == [17, 17, 17, 17]
    with torch.no_grad():
        assert torch.equal(c(x), capture(m, (x,))(x))


@pytest.mark.parametrize("importance", ["wpr", "cls", "random"])
def test_batch_independence_and_prefix_kept_distilled(importance):
    m = tiny_deit_distilled()                               # CLS at 0, distillation token at 1
    x = torch.randn(3, 3, 64, 64)
    p = ZeroTPrune(prune_blocks=[0, 1, 2], keep=[0.75, 0.7, 0.6], importance=importance)
    c = vitprune.compile(m, [p], example_inputs=x)
    rec = c.report.passes[0]
    assert rec["tokens_per_block"] == [18, 14, 10, 7]        # 16 -> 12 -> 8 -> 5 patches, + 2 prefix
    with torch.no_grad():
        full = c(x)
        for i in range(3):
            torch.testing.assert_close(c(x[i:i + 1]), full[i:i + 1], atol=1e-5, rtol=1e-5)
    kept = kept_token_indices(c, x)
    assert [k.shape[1] for k in kept] == [14, 10, 7]
    for k in kept:
        assert torch.equal(k[:, :2], torch.tensor([[0, 1]] * 3))
        assert bool((k[:, 1:] > k[:, :-1]).all())
    for i in range(3):                                       # the kept sets are per sample
        alone = kept_token_indices(c, x[i:i + 1])
        assert all(torch.equal(a[0], k[i]) for a, k in zip(alone, kept))


def test_nested_kept_indices_and_record_indices():
    m = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    c = vitprune.compile(m, [ZeroTPrune(prune_blocks=[0, 2], keep=[0.75, 0.5], record_indices=True)], example_inputs=x)
    kept = kept_token_indices(c, x)
    assert set(kept[1][0].tolist()) <= set(kept[0][0].tolist())        # later layers keep a subset
    assert c.report.passes[0]["kept_indices"] == [k.tolist() for k in kept]


def analytic_macs(depth, n0, p, d, heads, mlp, patch_macs, num_classes, layers):
    """Independent count: per block 4·N·D² + 2·N²·D + 2·N·D·M; per pruning layer I′ WPR (H·N²),
    S-stage cosine (|A|·|B|·D) and I-stage WPR (T·H·N_s²). ``layers``: {block: (r_s, r_i, T)}."""
    total, n = patch_macs + d * num_classes, n0
    for blk in range(depth):
        total += 4 * n * d * d + 2 * n * n * d + 2 * n * d * mlp
        if blk in layers:
            r_s, r_i, t = layers[blk]
            if r_s:
                m = n - p
                total += heads * n * n + (m // 2) * ((m + 1) // 2) * d
            if r_i:
                total += t * heads * (n - r_s) ** 2
            n -= r_s + r_i
    return total / 1e9


@pytest.mark.parametrize("kw,layers", [
    (dict(prune_blocks=[0, 3], counts=[6, 3]), {0: (3, 3, 30), 3: (2, 1, 1)}),   # T: first 3 blocks 30, last 3 (of 5) 1
    (dict(prune_blocks=[1], counts=[5], rs_ratio=1.0, layer_iters=[7]), {1: (5, 0, 7)}),
    (dict(prune_blocks=[0, 1, 2], counts=[4], importance="cls"), {}),
])
def test_gmacs_match_independent_analytic_count(kw, layers):
    depth, img = 5, 96
    m = tiny_vit(depth=depth, img=img)                       # 36 patches + CLS
    x = torch.randn(2, 3, img, img)
    p = ZeroTPrune(mode="prune", **{"rs_ratio": 0.5, **kw})
    c = vitprune.compile(m, [p], example_inputs=x)
    rec = c.report.passes[0]
    if not layers:                                           # baselines: no pruning-layer work
        layers = {b: (0, r, 0) for b, r in zip(kw["prune_blocks"], [4, 4, 4])}
    assert rec["r_s"] == [v[0] for _, v in sorted(layers.items())]
    want = analytic_macs(depth, 37, 1, 48, 3, 192, 36 * 48 * 3 * 256, 10, layers)
    measured = gmacs(c.graph_module, (3, img, img))
    assert abs(measured - want) <= 0.01 * want
    assert abs(rec["gmacs_analytic"] - measured) <= 1e-3 * measured


@pytest.mark.slow
def test_target_gmacs_hit_within_one_percent():
    # dim 96: at dim 48 one token more per layer moves the GMACs by up to 3 %, so a budget can
    # fall between two schedules (the next test)
    m = tiny_vit(depth=6, img=96, dim=96)
    x = torch.randn(2, 3, 96, 96)
    base = gmacs(capture(m, (x,)), (3, 96, 96))
    for frac in (0.8, 0.65):
        target = frac * base
        c = vitprune.compile(m, [ZeroTPrune(prune_blocks=[0, 1, 2, 3], target_gmacs=target)], example_inputs=x)
        measured = gmacs(c.graph_module, (3, 96, 96))
        assert abs(measured - target) <= 0.01 * target, (measured, target)
        assert c.report.passes[0]["gmacs_target"] == pytest.approx(target, rel=1e-4)


def test_budget_between_two_schedules_is_refused_with_the_nearest():
    from vitprune.ir.cost import ViTDims

    m = tiny_vit(depth=6, img=96)
    x = torch.randn(2, 3, 96, 96)
    gm = capture(m, (x,))
    target = 0.65 * gmacs(gm, (3, 96, 96))
    p = ZeroTPrune(prune_blocks=[0, 1, 2, 3], target_gmacs=target)
    with pytest.raises(InvalidPassConfigError, match=r"cannot hit .* within 1 % .*nearest"):
        vitprune.compile(m, [p], example_inputs=x, progress=False)
    info = ViTDims.from_graph(gm, image_shape=(3, 96, 96))               # brute force over keep rates
    reached = [p.analytic_gmacs(info, p._layers_from_keep(info, [0, 1, 2, 3], [k / 1000], clamp=True))
               for k in range(20, 1001)]
    assert min(abs(g - target) for g in reached) > 0.01 * target


@pytest.mark.parametrize("depth", [2, 3, 4, 6, 12, 24])
def test_default_prune_blocks_every_other_block_from_a_quarter_depth(depth):
    from vitprune.passes.tokens.zero_tprune import default_prune_blocks

    blocks = default_prune_blocks(depth)
    last = max(depth - 3, depth // 4)                                         # the third-to-last block
    assert blocks[0] == depth // 4 and blocks[-1] <= last < blocks[-1] + 2
    assert all(b - a == 2 for a, b in zip(blocks, blocks[1:]))
    three = default_prune_blocks(depth, 3)                                    # keep=[a;b;c] without prune_blocks
    assert three == sorted(set(three)) and all(0 <= b <= depth - 2 for b in three)
    if depth >= 8:
        assert len(three) == 3


@pytest.mark.slow
def test_presets_on_deit_small_hit_the_papers_budgets():
    import timm

    m = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    x = torch.zeros(2, 3, 224, 224)
    gm = capture(m, (x,))
    for name, budget in PRESETS.items():                      # a 2.97, b 2.50, c 3.97 GMACs
        plans, g = ZeroTPrune(preset=name).plan(gm)
        assert abs(g - budget) <= 0.01 * budget, (name, g)
    c = vitprune.compile(m, ["zero-tprune:preset=a"], example_inputs=x, check_parity=False)
    assert abs(c.report.gmacs_after - PRESETS["a"]) <= 0.01 * PRESETS["a"]


@pytest.mark.slow
def test_exports_to_onnx_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    m = tiny_vit(depth=3)
    x = torch.randn(2, 3, 64, 64)
    c = vitprune.compile(m, [ZeroTPrune(prune_blocks=[0, 1], keep=[0.75, 0.6])], example_inputs=x)
    out, ops = onnxruntime_run(c.graph_module, x, str(tmp_path / "ztp.onnx"))
    with torch.no_grad():
        ref = c(x)
    assert float((torch.from_numpy(out) - ref).abs().max()) <= 1e-4
    assert not ops & {"ScatterElements", "ScatterND", "NonZero"}, ops


@pytest.mark.slow
def test_tvm_imports_and_runs():
    pytest.importorskip("tvm")
    m = tiny_vit(depth=2, dim=24)
    x = torch.randn(1, 3, 64, 64)
    c = vitprune.compile(m, [ZeroTPrune(prune_blocks=[0], keep=[0.5])], example_inputs=x)
    out = tvm_run(c.graph_module, x)
    with torch.no_grad():
        ref = c(x)
    assert float((torch.from_numpy(out) - ref).abs().max()) <= 1e-4


def test_json_round_trip_and_spec():
    p = ZeroTPrune(prune_blocks=[2, 5, 8], keep=[0.9, 0.8, 0.7], rs_ratio=0.3, var_norm="sum_sq_dev")
    q = Pass.from_json(p.to_json())
    assert q == p and isinstance(q, ZeroTPrune)
    s = parse_pass_spec("zero-tprune:prune_blocks=2;5;8,keep=0.9;0.8;0.7,rs_ratio=0.3,var_norm=sum_sq_dev")
    assert s == p
    assert parse_pass_spec("zero-tprune:preset=a").preset == "a"
    assert parse_pass_spec("zero-tprune:target_gmacs=0.96").target_gmacs == 0.96
    assert json.loads(p.to_json())["pass"] == "zero-tprune"


@pytest.mark.parametrize("kw,msg", [
    (dict(keep=[1.2]), r"keep rate 1.2 outside \(0, 1\]"),
    (dict(keep=[0.0]), r"keep rate 0.0 outside \(0, 1\]"),
    (dict(counts=[-1]), r"count -1 must be an int >= 0"),
    (dict(mode="fuse", keep=[0.5]), r"mode='fuse' is not one of prune, merge"),
    (dict(preset="d"), r"preset='d' is not one of a, b, c"),
    (dict(importance="grad", keep=[0.5]), r"importance='grad' is not one of wpr, cls, random"),
    (dict(var_norm="std", keep=[0.5]), r"var_norm='std' is not one of mean1, sum_sq_dev, raw"),
    (dict(), r"no schedule"),
    (dict(keep=[0.5], target_gmacs=1.0), r"exactly one schedule source"),
    (dict(prune_blocks=[3, 1], keep=[0.5]), r"strictly increasing"),
    (dict(prune_blocks=[1, 2], keep=[0.5, 0.5, 0.5]), r"keep has 3 entries but prune_blocks has 2"),
    (dict(keep=[0.5], rs_ratio=1.5), r"rs_ratio=1.5 outside \[0, 1\]"),
    (dict(keep=[0.5], vmin=0.8, vmax=0.7), r"VHF band"),
    (dict(target_gmacs=-1.0), r"target_gmacs=-1.0 must be > 0"),
])
def test_bad_config_rejected_before_graph(kw, msg):
    with pytest.raises(InvalidPassConfigError, match=msg):
        ZeroTPrune(**kw).validate()


def test_bad_spec_rejected_by_compile_before_capture():
    with pytest.raises(InvalidPassConfigError, match="keep rate"):
        vitprune.compile(object(), ["zero-tprune:keep=1.5"])         # no model needed to fail


@pytest.mark.parametrize("kw,msg", [
    (dict(prune_blocks=[3], keep=[0.5]), r"prune_blocks \[3\] outside the model: .* after block 0..2"),
    (dict(prune_blocks=[0, 1], counts=[10, 8]), r"removes 8 tokens but has 6 non-prefix tokens; valid range 0..5"),
    (dict(prune_blocks=[0], target_gmacs=1e-6), r"below what pruning .* can reach .*valid range"),
    (dict(prune_blocks=[0], target_gmacs=10.0), r"above the dense model"),
])
def test_model_dependent_errors_leave_graph_untouched(kw, msg):
    m = tiny_vit(depth=4)
    x = torch.randn(2, 3, 64, 64)
    gm = capture(m, (x,))
    before = gm.code
    p = ZeroTPrune(**kw)
    p.validate()
    ctx = PassContext(example_inputs=(x,))
    with pytest.raises(InvalidPassConfigError, match=msg):
        p(gm, ctx)
    assert gm.code == before


@pytest.mark.slow
def test_merge_mode_counts_exports_and_is_per_sample(tmp_path):
    m = tiny_vit(depth=4)
    x = torch.randn(3, 3, 64, 64)
    p = ZeroTPrune(prune_blocks=[0, 2], keep=[0.75, 0.5], mode="merge", rs_ratio=0.7, merge_all=False)
    c = vitprune.compile(m, [p], example_inputs=x)
    rec = c.report.passes[0]
    # merging the S pairs only adds the one-hot matmuls N·r_S·(C+1) to the prune-mode count
    prune = vitprune.compile(m, [ZeroTPrune(prune_blocks=[0, 2], keep=[0.75, 0.5], rs_ratio=0.7, mode="prune")],
                             example_inputs=x)
    extra = sum(n * r * 49 for n, r in zip([17, 13], rec["r_s"])) / 1e9
    assert gmacs(c.graph_module, (3, 64, 64)) == pytest.approx(gmacs(prune.graph_module, (3, 64, 64)) + extra, rel=1e-6)
    assert rec["gmacs_analytic"] == pytest.approx(gmacs(c.graph_module, (3, 64, 64)), rel=1e-3)
    with torch.no_grad():
        full = c(x)
        for i in range(3):
            torch.testing.assert_close(c(x[i:i + 1]), full[i:i + 1], atol=1e-5, rtol=1e-5)
    assert [k.shape[1] for k in kept_token_indices(c, x)] == [13, 7]
    pytest.importorskip("onnxruntime")
    out, _ = onnxruntime_run(c.graph_module, x, str(tmp_path / "ztp_merge.onnx"))
    assert float((torch.from_numpy(out) - full).abs().max()) <= 1e-4


def test_merge_with_unit_sizes_and_no_s_stage_equals_prune():
    m = tiny_vit(depth=3)
    x = torch.randn(2, 3, 64, 64)
    kw = dict(prune_blocks=[0], keep=[0.5], rs_ratio=0.0)
    a = vitprune.compile(m, [ZeroTPrune(mode="merge", merge_all=False, **kw)], example_inputs=x)
    b = vitprune.compile(m, [ZeroTPrune(mode="prune", **kw)], example_inputs=x)
    with torch.no_grad():                                    # sizes stay 1: log(1) = 0 bias
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    c = vitprune.compile(m, [ZeroTPrune(**kw)], example_inputs=x)       # default merge_all: I-stage merges
    with torch.no_grad():
        assert not torch.allclose(c(x), b(x), atol=1e-3)


@pytest.mark.parametrize("importance", ["cls", "random"])
def test_baselines_stay_pure_pruning_with_default_merge_all(importance):
    m = tiny_vit(depth=4)
    x = torch.randn(2, 3, 64, 64)
    kw = dict(prune_blocks=[0, 2], keep=[0.6, 0.5], importance=importance)
    assert ZeroTPrune(**kw).merge_all is True and ZeroTPrune(**kw).mode == "merge"
    a = vitprune.compile(m, [ZeroTPrune(**kw)], example_inputs=x)
    b = vitprune.compile(m, [ZeroTPrune(mode="prune", merge_all=False, **kw)], example_inputs=x)
    assert gmacs(a.graph_module, (3, 64, 64)) == gmacs(b.graph_module, (3, 64, 64))
    assert a.report.passes[0]["gmacs_analytic"] == b.report.passes[0]["gmacs_analytic"]
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
    from vitprune.ir.tags import token_select_outputs
    assert [t["kind"] for _, t in token_select_outputs(a.graph_module)] == ["prune", "prune"]
    assert not any(n.target == torch.ops.aten.log.default for n in a.graph_module.graph.nodes)   # no sizes


def test_merge_all_merges_every_removed_token_into_a_kept_one():
    from vitprune.ops.merge import merge_tokens
    from vitprune.ops.zero_tprune_layer import select_tokens
    from vitprune.ops.token_select import gather_tokens

    torch.manual_seed(0)
    n = 17
    attn = torch.softmax(torch.randn(2, 3, n, n), dim=-1)
    keys = torch.randn(2, 3, n, 16)
    kept, src, dst = select_tokens(attn, keys, n_after_s=14, n_keep=10, num_prefix=1, return_merge=True,
                                   merge_all=True)
    assert src.shape == dst.shape == (2, n - 10)                          # r_S + r_I pairs
    for b in range(2):
        k, s, d = set(kept[b].tolist()), set(src[b].tolist()), set(dst[b].tolist())
        assert k | s == set(range(n)) and not k & s and 0 in k
        assert d <= k - {0}                                              # targets: kept patch tokens only
    x = torch.randn(2, n, 8)
    mx, msize = merge_tokens(x, torch.ones(2, n, 1), src, dst)
    size = gather_tokens(msize, kept)
    torch.testing.assert_close(size.sum(1), torch.full((2, 1), float(n)))    # every token is counted once
    torch.testing.assert_close((gather_tokens(mx, kept) * size).sum(1), x.sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_merge_all_counts_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    m = tiny_vit(depth=4)
    x = torch.randn(3, 3, 64, 64)
    kw = dict(prune_blocks=[0, 2], keep=[0.6, 0.5], rs_ratio=0.5)
    assert ZeroTPrune(**kw).merge_all is True                             # the default
    c = vitprune.compile(m, [ZeroTPrune(**kw)], example_inputs=x)
    base = vitprune.compile(m, [ZeroTPrune(merge_all=False, **kw)], example_inputs=x)
    rec = c.report.passes[0]
    assert all(r > 0 for r in rec["r_i"])
    # merge_all adds the I-removed -> kept cosine matmul r_I·(K-P)·H·d and merge matmuls N·r_I·(C+1)
    n_in = [17] + rec["tokens_per_layer"][:-1]
    extra = sum(r * (k - 1) * 48 + n * r * 49 for n, r, k in zip(n_in, rec["r_i"], rec["tokens_per_layer"])) / 1e9
    measured = gmacs(c.graph_module, (3, 64, 64))
    assert measured == pytest.approx(gmacs(base.graph_module, (3, 64, 64)) + extra, rel=1e-6)
    assert rec["gmacs_analytic"] == pytest.approx(measured, rel=1e-3)
    with torch.no_grad():
        full = c(x)
        for i in range(3):
            torch.testing.assert_close(c(x[i:i + 1]), full[i:i + 1], atol=1e-5, rtol=1e-5)
    assert [k.shape[1] for k in kept_token_indices(c, x)] == rec["tokens_per_layer"]
    out, ops = onnxruntime_run(c.graph_module, x, str(tmp_path / "ztp_merge_all.onnx"))
    assert float((torch.from_numpy(out) - full).abs().max()) <= 1e-4
    assert not ops & {"ScatterElements", "ScatterND", "NonZero"}, ops
    for spec, want in (("zero-tprune:target_gmacs=0.85", True), ("zero-tprune:target_gmacs=0.85,merge_all=false", False)):
        q = parse_pass_spec(spec)
        assert q.merge_all is want and json.loads(q.to_json())["merge_all"] is want and Pass.from_json(q.to_json()) == q
