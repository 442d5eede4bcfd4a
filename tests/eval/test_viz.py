"""Kept-token maps: groups read from the tagged graph against the pass's own selections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitprune
from vitprune.eval.viz import draw_kept_tokens, token_groups

torch.set_num_threads(1)


def tiny_vit(depth=3):
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=depth, num_heads=3, num_classes=10).eval()


def test_tome_groups_account_for_every_token_and_match_sizes():
    m = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    c = vitprune.compile(m, ["tome:r=3"], example_inputs=x)
    layers = token_groups(c, x)
    assert [L["block"] for L in layers] == [0, 1, 2]
    tokens = c.report.passes[0]["tokens"]  # [17, 14, 11, 8]
    for L, n_out in zip(layers, tokens[1:]):
        g = L["group"]
        assert g.shape == (2, 17) and (g >= 0).all()           # merging drops nothing
        for b in range(2):
            assert sorted(set(g[b].tolist())) == list(range(n_out))  # every output token is used
        assert (g[:, 0] == 0).all()                             # CLS stays token 0, alone
        assert ((g == 0).sum(1) == 1).all()


def test_prune_groups_from_tags(monkeypatch):
    # a minimal tagged pruning graph: keep the CLS and the patches with the largest mean value
    from vitprune.ir.capture import capture, recapture
    from vitprune.ir.match import find_attention_sites
    from vitprune.ir.rewrite import relax_token_dim
    from vitprune.ir.tags import tag_token_select

    def keep_top(x, k):
        idx = torch.topk(x[:, 1:].mean(-1), k, dim=1).indices + 1
        idx = torch.sort(idx, dim=1).values
        return torch.cat([torch.zeros_like(idx[:, :1]), idx], 1)

    def take(x, idx):
        return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    m = tiny_vit(depth=2)
    x = torch.randn(2, 3, 64, 64)
    gm = capture(m, x)
    site = find_attention_sites(gm)[0]
    out = site.block_output
    g = gm.graph
    with g.inserting_before(out.next):
        idx = g.call_function(keep_top, (out, 6))
        new = g.call_function(take, (out, idx))
    tag_token_select(idx, block=0, kind="prune", tokens_in=17)
    out.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new and u is not idx)
    relax_token_dim(gm, new, 17)
    gm = recapture(gm, (x,))
    layers = token_groups(gm, x)
    assert len(layers) == 1
    # independent: recompute the block-0 output eagerly and the kept set
    with torch.no_grad():
        t = m._pos_embed(m.patch_embed(x))
        t = m.blocks[0](t)
        want = keep_top(t, 6)
    grp = layers[0]["group"]
    for b in range(2):
        kept = torch.nonzero(grp[b] >= 0).flatten()
        assert kept.tolist() == want[b].tolist()
        assert grp[b][kept].tolist() == list(range(7))


def test_draw_writes_png(tmp_path):
    layers = [{"block": 2, "kind": "prune", "group": torch.tensor([[0] + [i if i % 3 else -1 for i in range(1, 17)]])},
              {"block": 5, "kind": "tome", "group": torch.tensor([[0] + [1 + (i // 2) for i in range(16)]])}]
    out = draw_kept_tokens(np.random.rand(64, 64, 3), layers, str(tmp_path / "k.png"), num_prefix=1, title="t")
    data = open(out, "rb").read(8)
    assert data == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_viz_writes_png_and_groups(tmp_path):
    from PIL import Image

    from vitprune.cli import main

    img = tmp_path / "n0_x.JPEG"
    Image.fromarray((np.random.default_rng(0).uniform(0, 255, (240, 260, 3))).astype(np.uint8)).save(img)
    out, js = tmp_path / "map.png", tmp_path / "map.json"
    rc = main(["viz", "--model", "deit_tiny_patch16_224", "--image", str(img), "--pass", "tome:r=20",
               "--out", str(out), "--json", str(js)])
    assert rc == 0 and open(out, "rb").read(4) == b"\x89PNG"
    import json
    layers = json.load(open(js))["layers"]
    assert [L["tokens"] for L in layers][:3] == [177, 157, 137]  # 197 - 20 per block, CLS included
    assert rc == 0
    assert main(["viz", "--model", "deit_tiny_patch16_224", "--image", str(img), "--out", str(out)]) == 2


def _ztp_reference_groups(n, kept, src, dst):
    """Independent per-layer map for one sample (plain Python): token -> output position or -1.
    A source joins its destination; a destination the I-stage dropped takes its sources along."""
    kept, src, dst = kept.tolist(), src.tolist(), dst.tolist()
    pos = {t: i for i, t in enumerate(kept)}
    join = dict(zip(src, dst))
    return [pos.get(join.get(t, t), -1) for t in range(n)]


@pytest.mark.parametrize("merge_all", [True, False])
@pytest.mark.slow
def test_ztp_merge_groups_against_eager_selection_and_carried_sizes(merge_all):
    from vitprune.eval.viz import layer_label
    from vitprune.ops.zero_tprune_layer import select_tokens
    from vitprune.passes import ZeroTPrune

    torch.manual_seed(0)
    m = VisionTransformer(img_size=96, patch_size=16, embed_dim=48, depth=4, num_heads=3, num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96)
    c = vitprune.compile(m, [ZeroTPrune(prune_blocks=[0, 1, 2], counts=[10, 8, 6], merge_all=merge_all)],
                         example_inputs=x)
    rec = c.report.passes[0]
    assert rec["r_s"] == [7, 6, 4] and rec["r_i"] == [3, 2, 2]
    layers = token_groups(c, x)
    assert [L["kind"] for L in layers] == ["merge"] * 3
    # (1) the first layer against the op run eagerly on the timm block's own attention and keys
    blk = m.blocks[0]
    with torch.no_grad():
        y = blk.norm1(m._pos_embed(m.patch_embed(x)))
        q, k, _ = blk.attn.qkv(y).reshape(2, 37, 3, 3, 16).permute(2, 0, 3, 1, 4)
        attn = ((q * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    kept, src, dst = select_tokens(attn, k, n_after_s=30, n_keep=27, num_prefix=1, iters=30, return_merge=True,
                                   merge_all=merge_all)
    for b in range(2):
        assert layers[0]["group"][b].tolist() == _ztp_reference_groups(37, kept[b], src[b], dst[b])
    # (2) every layer: group sizes == the token sizes the merge variant carries (exp of the
    # log(size) attention bias of the next block), every output token is used, CLS stays alone
    from vitprune.ir.values import node_values
    logs = [n for n in c.graph_module.graph.nodes if n.target == torch.ops.aten.log.default]
    vals = node_values(c.graph_module, (x,), set(logs))
    sizes = [vals[n].exp().round().to(torch.int64) for n in logs]          # [B, K_l] per layer
    assert [s.shape[1] for s in sizes] == rec["tokens_per_layer"]
    for L, size in zip(layers, sizes):
        g = L["group"]
        for b in range(2):
            counts = torch.bincount(g[b][g[b] >= 0], minlength=size.shape[1])
            assert counts.tolist() == size[b].tolist()
            assert g[b, 0] == 0 and counts[0] == 1
    if merge_all:                                                          # nothing is dropped
        for L, n_out in zip(layers, rec["tokens_per_layer"]):
            assert (L["group"] >= 0).all()
            for b in range(2):
                assert layer_label(L["group"][b, 1:].numpy(), "merge") == f"{n_out - 1} tokens ({36 - n_out + 1} merged, 0 dropped)"
    else:
        assert (layers[0]["group"] < 0).sum(1).min() >= rec["r_i"][0]      # I-stage drops at least r_I
    # mode=prune still tags plain kept indices
    p = vitprune.compile(m, [ZeroTPrune(prune_blocks=[0, 1, 2], counts=[10, 8, 6], mode="prune")], example_inputs=x)
    assert [L["kind"] for L in token_groups(p, x)] == ["prune"] * 3


def test_merge_groups_hand_made_with_dropped_destination():
    from vitprune.eval.viz import layer_label
    from vitprune.ir.tags import tag_token_select
    from vitprune.ops.merge import pack_selection

    def layer1(x):   # N=7: kept 0 2 4 5; 1 -> 2; 6 -> 3, but the I-stage dropped 3
        t = torch.tensor
        return pack_selection(t([[0, 2, 4, 5]]), t([[1, 6]]), t([[2, 3]])).expand(x.shape[0], -1)

    def layer2(x):   # N=4: kept 0 1; 3 (orig 5) -> 1 (orig 2); 2 (orig 4) dropped
        t = torch.tensor
        return pack_selection(t([[0, 1]]), t([[3]]), t([[1]])).expand(x.shape[0], -1)

    g = torch.fx.Graph()
    xin = g.placeholder("x")
    a, b = g.call_function(layer1, (xin,)), g.call_function(layer2, (xin,))
    g.output((a, b))
    tag_token_select(a, block=0, kind="merge", tokens_in=7, n_keep=4, r_s=2)
    tag_token_select(b, block=1, kind="merge", tokens_in=4, n_keep=2, r_s=1)
    layers = token_groups(torch.fx.GraphModule(torch.nn.Module(), g), torch.zeros(2, 3, 8, 8))
    assert layers[0]["group"].tolist() == [[0, 1, 1, -1, 2, 3, -1]] * 2
    assert layers[1]["group"].tolist() == [[0, 1, 1, -1, -1, 1, -1]] * 2
    assert layer_label(layers[1]["group"][0, 1:].numpy(), "merge") == "1 tokens (2 merged, 3 dropped)"
    assert layer_label(np.array([1, -1, 2, 3]), "prune") == "3/4 patches kept"


def test_colour_keys_follow_group_members_not_positions():
    from vitprune.eval.viz import colour_keys

    # the same two groups ({0, 2}, {1, 3}) at different output positions, and one dropped patch
    a = colour_keys(np.array([5, 7, 5, 7, -1]))
    b = colour_keys(np.array([1, 0, 1, 0, -1]))
    assert a.tolist() == b.tolist() == [0, 1, 0, 1, -1]
    # group {1, 3} absorbs {0, 2}: the merged group takes the colour of its lowest patch
    assert colour_keys(np.array([4, 4, 4, 4, -1])).tolist() == [0, 0, 0, 0, -1]
