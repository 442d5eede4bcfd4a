"""Small models for backend tests: a 2-block timm ViT and a token-pruned graph (TVM_NOTES.md §3)."""

import os
import shutil

import pytest
import torch
from torch import nn

torch.set_num_threads(1)
os.environ.setdefault("TVM_NUM_THREADS", "1")


def tiny_vit(num_classes: int = 10):
    import timm

    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes).eval()


class _Block(nn.Module):
    """Pre-norm ViT block with explicit softmax attention (returns the probabilities too)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.n1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.n2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * self.hd ** -0.5).softmax(-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.n2(x)))), a


class TinyPruned(nn.Module):
    """Patch embed -> block 1 (explicit attention) -> power-iteration token scores (log, div) ->
    topk of patch tokens + gather + sort-free cat with CLS -> block 2 on K+1 tokens -> head.

    The ops a token-pruning pass emits: softmax, matmul, topk, gather, cat, slice, log, mean.
    """

    def __init__(self, dim: int = 32, heads: int = 2, keep: int = 8, classes: int = 10):
        super().__init__()
        self.keep = keep
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.5)
        self.b1, self.b2 = _Block(dim, heads), _Block(dim, heads)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, img):
        x = self.embed(img).flatten(2).transpose(1, 2)
        b, _, c = x.shape
        x = torch.cat([self.cls.expand(b, -1, -1), x], 1) + self.pos
        x, a = self.b1(x)
        A = a.mean(1)
        s = torch.ones(b, A.shape[1], 1) / A.shape[1]
        for _ in range(3):
            s = A.transpose(1, 2) @ s
            s = s / s.sum(dim=1, keepdim=True)
        score = torch.log(s.squeeze(-1) + 1e-6)
        idx = torch.topk(score[:, 1:], self.keep, dim=1).indices + 1
        kept = torch.gather(x, 1, idx.unsqueeze(-1).expand(b, self.keep, c))
        x, _ = self.b2(torch.cat([x[:, :1], kept], 1))
        return self.head(self.norm(x)[:, 0])


@pytest.fixture(scope="session")
def vit():
    return tiny_vit()


@pytest.fixture(scope="session")
def pruned_gm():
    from vitprune.ir.capture import export_program

    torch.manual_seed(1)
    model = TinyPruned().eval()
    x = torch.randn(1, 3, 32, 32)
    return export_program(model, (x,)).module(), model


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("VITPRUNE_CACHE", str(d))
    return d


needs_cross = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                                 reason="aarch64-linux-gnu-g++ not installed "
                                        "(apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)")
