"""The pruning sweep's reuse of values it already has (the Fisher forward's unpruned residual
streams, the pruned graph's fc2 input after MLP surgery) against recomputing them: the same values
(double precision, equal to rounding) and the same pruned model (fp32, as SNP's refits)."""

import pytest
import timm
import torch

from vitprune.ir.capture import capture
from vitprune.ir.match import find_attention_sites
from vitprune.ir.values import node_values
from vitprune.passes.snp import engine
from vitprune.passes.snp.engine import prune_blocks
from vitprune.passes.snp.sensitivity import block_fisher_scores
from vitprune.passes.snp.snp import SNP
from vitprune.passes.snp.surgery import finalize

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", depth=3, num_classes=10).eval()
    x = torch.randn(6, 3, 224, 224)
    gm = capture(m, (x[:2],))
    return gm, x, find_attention_sites(gm)


def test_fisher_activations_are_the_original_graphs_values():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", depth=3, num_classes=10).eval().double()
    x = torch.randn(6, 3, 224, 224, dtype=torch.float64)
    gm = capture(m, (x[:2],))
    sites = find_attention_sites(gm)
    acts = {}
    block_fisher_scores(gm, sites, x, batch_size=4, structures=False, activations=acts)  # 4 + 2 rows
    nodes = [n for s in sites for n in (s.attn_residual, s.mlp_residual)]
    assert set(acts) == set(nodes)
    ref = node_values(gm, x, nodes)  # a plain no-grad forward of all rows at once
    for n in nodes:
        torch.testing.assert_close(acts[n], ref[n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reuse", ["fisher-activations", "fc2-input"])
def test_reuse_gives_the_model_of_a_recomputation(setup, reuse, monkeypatch):
    gm, x, sites = setup
    opts = SNP(ratio=0.3, batch_size=2, token_weight="fisher")
    acts = {}
    scores = block_fisher_scores(gm, sites, x, batch_size=2, structures=False, activations=acts)
    plans = opts.uniform_plans(sites, 0.0)

    def pruned(original):
        out, _ = prune_blocks(gm, x, plans, opts, "activation", 1, scores, original=original)
        return finalize(out, (x[:2],))

    if reuse == "fisher-activations":
        with_reuse, without = pruned(acts), pruned(None)
    else:
        with_reuse = pruned(None)
        monkeypatch.setattr(engine._Stream, "give", lambda self, i, node, value: None)
        without = pruned(None)
    y = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = with_reuse(y), without(y)
    assert not torch.equal(a, gm(y))  # the blocks were pruned and refit
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_no_original_values_after_a_token_pass(setup):
    """A token selection's integer values would be needed too: the graph after Zero-TPrune takes
    none (and SNP keeps no Fisher activations for it); the plain ViT does."""
    from vitprune.passes.base import PassContext, parse_pass_spec
    from vitprune.passes.snp.engine import can_take_original

    gm, x, _ = setup
    tokens = parse_pass_spec("zero-tprune:prune_blocks=1,keep=0.5")(gm, PassContext(example_inputs=(x[:2],)))
    assert can_take_original(gm) and not can_take_original(tokens)
