"""Fisher mask scores (Kwon et al. 2022 §4.1) against finite differences of the loss of the
original timm module with the matching weights scaled (an independent reference)."""

import copy

import pytest
import timm
import torch

from vitprune.ir.capture import capture
from vitprune.ir.match import find_attention_sites
from vitprune.passes.snp.fisher import fisher_from_gradients, mask_gradients, pseudo_label_loss
from vitprune.passes.snp.sensitivity import block_fisher_scores

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", depth=2, num_classes=10).eval().double()
    x = torch.randn(3, 3, 224, 224, dtype=torch.float64)
    gm = capture(m, (x[:2],))
    return m, x, gm


def _per_image_loss(m, x, labels):
    with torch.no_grad():
        logits = m(x)
    return torch.stack([pseudo_label_loss(logits[b:b + 1], labels[b:b + 1]) for b in range(x.shape[0])])


def _fd(m, x, labels, scale_fn, eps=1e-4):
    """Central difference of each image's loss w.r.t. a multiplicative factor (1 + e)."""
    out = []
    for e in (eps, -eps):
        mm = copy.deepcopy(m)
        with torch.no_grad():
            scale_fn(mm, 1 + e)
        out.append(_per_image_loss(mm, x, labels))
    return (out[0] - out[1]) / (2 * eps)


def test_mask_gradients_match_finite_differences(setup):
    m, x, gm = setup
    s = find_attention_sites(gm)[1]
    labels = torch.tensor([1, 4, 7])
    nodes = {s.q: 2, s.proj.node.args[0]: 1, s.fc2.node.args[0]: 1}
    g, lab = mask_gradients(gm, x, nodes, labels)
    assert torch.equal(lab, labels)
    blk = m.blocks[1]
    D, d = 192, 64

    def fc1_neuron(j):
        def f(mm, c):
            mm.blocks[1].mlp.fc2.weight[:, j] *= c
        return f

    def v_neuron(h, i):
        def f(mm, c):
            mm.blocks[1].attn.proj.weight[:, h * d + i] *= c
        return f

    def qk_pair(h, n):
        def f(mm, c):  # q rows of the fused qkv: scaling them scales q_n of head h
            mm.blocks[1].attn.qkv.weight[h * d + n] *= c
            mm.blocks[1].attn.qkv.bias[h * d + n] *= c
        return f

    assert blk.attn.qkv.weight.shape[0] == 3 * D
    for j in (0, 17, 700):
        torch.testing.assert_close(g[s.fc2.node.args[0]][:, j], _fd(m, x, labels, fc1_neuron(j)), rtol=1e-5, atol=1e-8)
    for h, i in ((0, 3), (2, 63)):
        torch.testing.assert_close(g[s.proj.node.args[0]][:, h * d + i], _fd(m, x, labels, v_neuron(h, i)),
                                   rtol=1e-5, atol=1e-8)
    for h, n in ((1, 5), (2, 40)):
        torch.testing.assert_close(g[s.q][:, h, n], _fd(m, x, labels, qk_pair(h, n)), rtol=1e-5, atol=1e-8)


def test_block_scores_are_sums_of_squared_gradients(setup):
    m, x, gm = setup
    sites = find_attention_sites(gm)
    scores = block_fisher_scores(gm, sites, x, batch_size=2)
    with torch.no_grad():
        labels = m(x).argmax(-1)
    s = sites[0]
    g, _ = mask_gradients(gm, x, {s.q: 2, s.proj.node.args[0]: 1, s.fc2.node.args[0]: 1}, labels)
    gv = g[s.proj.node.args[0]].reshape(3, 3, 64)
    torch.testing.assert_close(scores[0].qk, (g[s.q].double() ** 2).sum(0))
    torch.testing.assert_close(scores[0].v, (gv.double() ** 2).sum(0))
    torch.testing.assert_close(scores[0].head, (gv.sum(-1).double() ** 2).sum(0))
    torch.testing.assert_close(scores[0].fc1, (g[s.fc2.node.args[0]].double() ** 2).sum(0))
    # head mask = all of its value neurons' masks at once
    def head(mm, c):
        mm.blocks[0].attn.proj.weight[:, 64:128] *= c
    torch.testing.assert_close(gv.sum(-1)[:, 1], _fd(m, x, labels, head), rtol=1e-5, atol=1e-8)


def test_fisher_from_gradients():
    g = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    torch.testing.assert_close(fisher_from_gradients(g), torch.tensor([10.0, 4.25], dtype=torch.float64))


def test_mask_gradients_bad_node(setup):
    _, x, gm = setup
    other = capture(timm.create_model("deit_tiny_patch16_224", depth=1, num_classes=10).eval().double(), (x[:2],))
    node = next(iter(other.graph.nodes))
    with pytest.raises(ValueError, match="not in the graph"):
        mask_gradients(gm, x, {node: 1})


def test_probe_gradients_match_finite_differences(setup):
    """``probes``: dL/dh of the residual stream after block 0's attention, checked by adding
    e * (one channel of one token) through a forward hook of the timm module."""
    m, x, gm = setup
    s = find_attention_sites(gm)[0]
    labels = torch.tensor([2, 3, 9])
    g, _ = mask_gradients(gm, x, {}, labels, probes=[s.attn_residual])
    gr = g[s.attn_residual]  # [B, N, D]
    tok, ch, eps = 5, 11, 1e-5

    def loss_with(e):
        mm = copy.deepcopy(m)

        def hook(mod, inp, out):  # DeiT block: x + attn(...) then + mlp(...): perturb after attention
            return out

        blk = mm.blocks[0]
        orig_attn_fwd = blk.attn.forward

        def attn_fwd(*a, **k):
            out = orig_attn_fwd(*a, **k)
            # ls1 and drop_path are identities in DeiT: attention output adds straight to the stream
            d = torch.zeros_like(out)
            d[:, tok, ch] = e
            return out + d
        blk.attn.forward = attn_fwd
        return _per_image_loss(mm, x, labels)

    fd = (loss_with(eps) - loss_with(-eps)) / (2 * eps)
    torch.testing.assert_close(gr[:, tok, ch], fd, rtol=1e-4, atol=1e-7)


def test_default_labels_are_the_models_own_top1(setup):
    """Without labels, the pseudo-labels are the eager timm module's top-1 (the masked forward's own
    logits are used), and the gradients are those of an explicit call with those labels."""
    m, x, gm = setup
    s = find_attention_sites(gm)[1]
    nodes = {s.q: 2, s.fc2.node.args[0]: 1}
    g, lab = mask_gradients(gm, x, nodes, probes=[s.attn_residual])
    with torch.no_grad():
        ref = m(x).argmax(-1)
    assert torch.equal(lab, ref)
    g_ref, _ = mask_gradients(gm, x, nodes, ref, probes=[s.attn_residual])
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=0, atol=0)


def test_token_weights_alone_equal_those_with_the_masks(setup):
    """``structures=False`` (no masks: what SNP's default needs) gives the same per-token weights."""
    _, x, gm = setup
    sites = find_attention_sites(gm)
    full = block_fisher_scores(gm, sites, x, batch_size=2)
    alone = block_fisher_scores(gm, sites, x, batch_size=2, structures=False)
    for f, a in zip(full, alone):
        assert a.qk is None and a.v is None and a.head is None and a.fc1 is None
        torch.testing.assert_close(a.attn_tokens, f.attn_tokens, rtol=1e-10, atol=0)
        torch.testing.assert_close(a.mlp_tokens, f.mlp_tokens, rtol=1e-10, atol=0)
