"""SNP and Zero-TPrune compose in either order, and the result lowers to ONNX with parity."""

import pytest
import timm
import torch

import vitprune
from vitprune.ir import find_attention_sites

pytest.importorskip("onnxruntime")

# augment=none: one view per calibration image (the default's 10 views change the statistics,
# not the graph surgery that composition exercises) keeps these tests short.
ORDERS = {
    "snp-then-zero-tprune": ["snp:ratio=0.2,compensate=false,augment=none",
                             "zero-tprune:prune_blocks=3;6;9,keep=0.8;0.8;0.8"],
    # Zero-TPrune's S-stage reads the keys that SNP then narrows (ir/width_repair.py); with recovery
    "zero-tprune-then-snp": ["zero-tprune:prune_blocks=3;6;9,keep=0.8;0.8;0.8", "snp:ratio=0.2,augment=none"],
}


@pytest.mark.parametrize("passes", list(ORDERS.values()), ids=list(ORDERS))
def test_snp_and_zero_tprune_compose(passes):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval()
    x = torch.randn(2, 3, 224, 224)
    calib = torch.randn(8, 3, 224, 224)
    # one compile lowered to ONNX: .graph_module is the pruned graph, calling the module runs onnxruntime
    onnx = vitprune.compile(model, passes=passes, example_inputs=x, backend="onnx", calibration=calib,
                            progress=False, check_parity=False)
    sites = find_attention_sites(onnx.graph_module)
    tokens = [s.num_tokens for s in sites]
    assert tokens[0] == 197 and tokens[4] < 197 and tokens[-1] < tokens[4], tokens
    assert sites[0].qkv_layout == "separate" and sites[0].q_proj.out_features < 192
    assert onnx.report.gmacs_after < 0.8 * onnx.report.gmacs_before
    x2 = torch.randn(3, 3, 224, 224)                     # another batch size than the example
    with torch.no_grad():
        assert (onnx(x2) - onnx.graph_module(x2)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("token_pass", ["zero-tprune", "tome"])
def test_token_budget_on_snp_pruned_widths(token_pass):
    """After SNP the blocks have different widths; a token pass's GMACs budget must still be met
    (measured by the FLOP counter, ±1 %), not the budget of a dense model of the same depth."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval()
    x, calib = torch.randn(2, 3, 224, 224), torch.randn(4, 3, 224, 224)
    snp = "snp:preset=deit-t,compensate=false,sequential=false,augment=none"   # widths differ per block
    g_snp = vitprune.compile(model, [snp], example_inputs=x, calibration=calib, progress=False).report.gmacs_after
    target = round(0.7 * g_snp, 4)
    both = vitprune.compile(model, [snp, f"{token_pass}:target_gmacs={target}"], example_inputs=x,
                            calibration=calib, progress=False)
    assert abs(both.report.gmacs_after - target) <= 0.01 * target, (both.report.gmacs_after, target)
