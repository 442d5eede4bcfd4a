"""SNP and Zero-TPrune compose in either order, and the result lowers to ONNX with parity."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitprune
from vitprune.ir import find_attention_sites

pytest.importorskip("onnxruntime")

# augment=none: one view per calibration image (the default's 10 views change the statistics,
# not the graph surgery that composition exercises) keeps these tests short.
ORDERS = {
    "snp-then-zero-tprune": ["snp:ratio=0.2,compensate=false,augment=none",
                             "zero-tprune:prune_blocks=1;3,keep=0.75;0.75"],
    # Zero-TPrune's S-stage reads the keys that SNP then narrows (ir/width_repair.py); with recovery
    "zero-tprune-then-snp": ["zero-tprune:prune_blocks=1;3,keep=0.75;0.75", "snp:ratio=0.2,augment=none"],
}


def tiny_vit():
    """A 6-block ViT on 64x64 images (17 tokens): the same graph structure as DeiT, far cheaper."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=6, num_heads=3, num_classes=10).eval()


@pytest.mark.parametrize("passes", list(ORDERS.values()), ids=list(ORDERS))
@pytest.mark.slow
def test_snp_and_zero_tprune_compose(passes):
    model = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    calib = torch.randn(8, 3, 64, 64)
    # one compile lowered to ONNX: .graph_module is the pruned graph, calling the module runs onnxruntime
    onnx = vitprune.compile(model, passes=passes, example_inputs=x, backend="onnx", calibration=calib,
                            progress=False, check_parity=False)
    sites = find_attention_sites(onnx.graph_module)
    tokens = [s.num_tokens for s in sites]
    assert tokens[0] == 17 and tokens[2] < 17 and tokens[-1] < tokens[2], tokens
    assert sites[0].qkv_layout == "separate" and sites[0].q_proj.out_features < 48
    assert onnx.report.gmacs_after < 0.8 * onnx.report.gmacs_before
    x2 = torch.randn(3, 3, 64, 64)                       # another batch size than the example
    with torch.no_grad():
        assert (onnx(x2) - onnx.graph_module(x2)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("token_pass", ["zero-tprune", "tome"])
@pytest.mark.slow
def test_token_budget_on_snp_pruned_widths(token_pass):
    """After SNP the blocks have different widths; a token pass's GMACs budget must still be met
    (measured by the FLOP counter, ±1 %), not the budget of a dense model of the same depth."""
    model = tiny_vit()
    x, calib = torch.randn(2, 3, 64, 64), torch.randn(4, 3, 64, 64)
    # widths differ per block
    snp = "snp:qk=0.5;0.25;0;0.5;0.25;0,v=0;0.5;0.25;0;0.5;0.25,fc1=0.5;0;0.25;0.5;0;0.25,compensate=false,sequential=false,augment=none"
    # the target is one the pass can reach on these widths: the FLOP-counted GMACs of an explicit schedule
    # (17 tokens make each token a ~4 % step, so an arbitrary target is reachable within 1 % only by chance)
    explicit = {"zero-tprune": "zero-tprune:keep=0.5", "tome": "tome:r=2"}[token_pass]
    target = vitprune.compile(model, [snp, explicit], example_inputs=x, calibration=calib,
                              progress=False).report.gmacs_after
    dense_widths = vitprune.compile(model, [explicit], example_inputs=x, progress=False).report.gmacs_after
    assert dense_widths > 1.1 * target                   # the widths matter: same schedule, dense widths, >10 % more
    both = vitprune.compile(model, [snp, f"{token_pass}:target_gmacs={target}"], example_inputs=x,
                            calibration=calib, progress=False)
    assert abs(both.report.gmacs_after - target) <= 0.01 * target, (both.report.gmacs_after, target)


@pytest.mark.parametrize("first,second,earlier", [
    ("zero-tprune:prune_blocks=1,keep=0.7", "tome:r=1", "zero-tprune after blocks [1]"),
    ("zero-tprune:prune_blocks=1,keep=0.7,mode=prune", "zero-tprune:prune_blocks=3,keep=0.7", "zero-tprune after blocks [1]"),
    ("tome:r=1", "zero-tprune:prune_blocks=2,keep=0.7", "tome after blocks [0, 1, 2, 3, 4, 5]"),
    ("tome:r=1", "tome:r=1", "tome after blocks [0, 1, 2, 3, 4, 5]"),
])
def test_a_token_pass_after_another_is_refused(first, second, earlier, capfd):
    """Token passes plan from the first block's tokens; on tokens an earlier pass reduced that gave
    a shape error deep inside torch (tome second) or a model that silently ignored its keep rate
    (zero-tprune twice). Now: one line naming the earlier layers and the fix, before any editing."""
    model = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    name = second.split(":")[0]
    with pytest.raises(vitprune.errors.InvalidPassConfigError) as e:
        vitprune.compile(model, [first, second], example_inputs=x, progress=False)
    msg = str(e.value)
    assert f"{name}: the tokens are already reduced" in msg and earlier in msg and "\n" not in msg
    assert "Traceback" not in capfd.readouterr().err
    # the same layers in one pass are fine
    vitprune.compile(model, [first], example_inputs=x, progress=False)
