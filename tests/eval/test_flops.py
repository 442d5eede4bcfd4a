"""GMACs count attention however it is computed, and match the analytic formula."""

import pytest
import timm
import torch

from vitprune.ir.cost import plain_vit_gmacs
from vitprune.ir.flops import gmacs
from vitprune.ir import capture


@pytest.mark.parametrize("fused", [True, False])
def test_deit_tiny_matches_formula(fused):
    model = timm.create_model("deit_tiny_patch16_224").eval()
    for b in model.blocks:
        b.attn.fused_attn = fused
    expected = plain_vit_gmacs(depth=12, tokens=197, dim=192)
    assert expected == pytest.approx(1.254, abs=5e-4)
    assert gmacs(model) == pytest.approx(expected, rel=0.01)
    assert gmacs(capture(model, torch.zeros(1, 3, 224, 224))) == pytest.approx(expected, rel=0.01)


def test_deit_small():
    model = timm.create_model("deit_small_patch16_224").eval()
    assert gmacs(model) == pytest.approx(plain_vit_gmacs(12, 197, 384), rel=0.01)
    assert gmacs(model) == pytest.approx(4.60, abs=0.01)
