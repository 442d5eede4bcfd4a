"""Capture + attention-site matching on every model family the issue lists."""

import pytest
import timm
import torch
import torchvision

from vitprune.errors import UnsupportedModelError
from vitprune.ir import capture, find_attention_sites

X = torch.randn(1, 3, 224, 224)

# (timm name, depth, heads, embed dim, prefix tokens)
TIMM_MODELS = [
    ("deit_tiny_patch16_224", 12, 3, 192, 1),
    ("deit_small_patch16_224", 12, 6, 384, 1),
    ("deit_base_patch16_224", 12, 12, 768, 1),
    ("deit_small_distilled_patch16_224", 12, 6, 384, 2),
    ("vit_small_patch16_224", 12, 6, 384, 1),
    ("vit_base_patch16_224", 12, 12, 768, 1),
]


def check_sites(gm, model, depth, heads, dim, prefix):
    sites = find_attention_sites(gm)
    assert [s.block_index for s in sites] == list(range(depth))
    for s in sites:
        assert (s.num_heads, s.head_dim, s.embed_dim) == (heads, dim // heads, dim)
        assert s.num_prefix_tokens == prefix and s.num_tokens == 196 + prefix
        assert s.scale == pytest.approx((dim // heads) ** -0.5)
        assert s.fc1 is not None and s.fc2 is not None and s.mlp_residual is not None
        assert s.proj.in_features == dim
    with torch.no_grad():
        ref = model(X)
        ref = ref.logits if hasattr(ref, "logits") else ref
        assert torch.allclose(gm(X), ref, atol=1e-5)
    return sites


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("name,depth,heads,dim,prefix", TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def test_timm_models(name, depth, heads, dim, prefix, fused):
    model = timm.create_model(name).eval()
    for b in model.blocks:
        b.attn.fused_attn = fused
    sites = check_sites(capture(model, X), model, depth, heads, dim, prefix)
    assert all(s.kind == ("sdpa" if fused else "explicit") for s in sites)
    assert all(s.qkv_layout == "fused" and s.qkv.out_features == 3 * dim for s in sites)
    assert sites[3].block_path == "blocks.3"
    if not fused:
        assert all(s.attn_probs is not None for s in sites)


def test_torchvision_vit_b_16():
    model = torchvision.models.vit_b_16().eval()
    sites = check_sites(capture(model, X), model, 12, 12, 768, 1)
    assert sites[0].qkv_layout == "fused" and sites[0].kind == "sdpa"
    assert sites[5].block_path == "encoder.layers.encoder_layer_5"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["vit", "deit"])
def test_hugging_face(family, impl):
    transformers = pytest.importorskip("transformers")
    if family == "vit":
        cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768)
        cls, prefix = transformers.ViTForImageClassification, 1
    else:
        cfg = transformers.DeiTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768)
        cls, prefix = transformers.DeiTForImageClassification, 2
    cfg._attn_implementation = impl
    model = cls(cfg).eval()
    sites = check_sites(capture(model, X), model, 4, 3, 192, prefix)
    assert all(s.qkv_layout == "separate" and s.q_proj.out_features == 192 for s in sites)
    assert all(s.extra["attn_mask"] is None for s in sites), "the all-allowed HF mask should be dropped"


def test_dynamic_batch():
    model = timm.create_model("deit_tiny_patch16_224").eval()
    gm = capture(model, X)
    x = torch.randn(5, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)


def test_user_model_not_mutated():
    model = timm.create_model("deit_tiny_patch16_224")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture(model, X)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_without_attention_is_rejected():
    model = timm.create_model("resnet18").eval()
    with pytest.raises(UnsupportedModelError, match="ResNet.*no attention"):
        find_attention_sites(capture(model, X))


class DataDependent(torch.nn.Module):
    def forward(self, x):
        n = int((x > 0).sum())  # data-dependent Python control flow
        return x.flatten(1)[:, :n]


def test_untraceable_model_is_rejected():
    with pytest.raises(UnsupportedModelError, match="DataDependent"):
        capture(DataDependent(), X)


def test_not_a_module_is_rejected():
    with pytest.raises(UnsupportedModelError, match="nn.Module"):
        capture(lambda x: x, X)


def test_bad_example_inputs():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        capture(timm.create_model("deit_tiny_patch16_224"), torch.randn(3, 224, 224))
