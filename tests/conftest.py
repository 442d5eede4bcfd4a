"""Shared fixtures: real DeiT-T weights and images from ../shared (skipped when absent)."""

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("VITPRUNE_SHARED", os.path.join(ROOT, "..", "shared"))
DEIT_T_WEIGHTS = os.path.join(SHARED, "models", "deit_tiny_patch16_224.safetensors")
IMAGENET_SAMPLE = os.path.join(SHARED, "data", "imagenet-sample")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def deit_tiny_real():
    """Real ImageNet DeiT-Tiny (eval mode)."""
    if not os.path.isfile(DEIT_T_WEIGHTS):
        pytest.skip(f"real weights not found at {DEIT_T_WEIGHTS}")
    from vitprune.models import load_model

    return load_model("deit_tiny_patch16_224", DEIT_T_WEIGHTS)


@pytest.fixture(scope="session")
def real_images(deit_tiny_real):
    """16 real ImageNet images [16, 3, 224, 224] with DeiT's eval transform."""
    if not os.path.isdir(IMAGENET_SAMPLE):
        pytest.skip(f"image folder not found at {IMAGENET_SAMPLE}")
    from vitprune.data import load_images
    from vitprune.models import eval_transform

    return load_images(IMAGENET_SAMPLE, eval_transform(deit_tiny_real), limit=16)
