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
