"""repair_widths: after a projection is made narrower in an exported graph, the stale static
widths of reshapes and gather indices are fixed; the result equals a fresh export of the
narrow model (independent reference)."""

import pytest
import torch
from torch import nn

from vitprune.ir.rewrite import set_param
from vitprune.ir.width_repair import repair_widths


class Flatten(nn.Module):
    """Projection -> per-head split -> flatten -> gather the top tokens (Zero-TPrune-like)."""

    def __init__(self, width: int, heads: int = 2):
        super().__init__()
        self.lin = nn.Linear(8, width)
        self.heads, self.width = heads, width

    def forward(self, x):                                   # x [B, N, 8]
        b, n, _ = x.shape
        k = self.lin(x).reshape(b, n, self.heads, self.width // self.heads).transpose(1, 2)  # [B, H, N, d]
        f = k.transpose(1, 2).reshape(b, n, self.width)                    # [B, N, H*d]
        idx = f.sum(-1).topk(3, dim=1).indices
        kept = torch.gather(f, 1, idx.unsqueeze(-1).expand(-1, -1, f.shape[-1]))
        return kept.square().sum(-1)


def _export(m, x):
    batch = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(m, (x,), dynamic_shapes=({0: batch},), strict=False).module()


def test_repair_matches_fresh_export_of_narrow_model():
    torch.manual_seed(0)
    wide, x = Flatten(12).eval(), torch.randn(2, 5, 8)
    gm = _export(wide, x)
    narrow = Flatten(8).eval()
    keep = [0, 1, 2, 3, 6, 7, 8, 9]                         # 4 of 6 neurons in each head
    with torch.no_grad():
        narrow.lin.weight.copy_(wide.lin.weight[keep])
        narrow.lin.bias.copy_(wide.lin.bias[keep])
    set_param(gm, "lin.weight", narrow.lin.weight.detach().clone())
    set_param(gm, "lin.bias", narrow.lin.bias.detach().clone())
    with pytest.raises(RuntimeError):
        gm(x)                                               # stale widths 12 / 6 baked in
    fixed = repair_widths(gm, x[:1], {12, 6})
    assert fixed == 3                                       # two reshapes and the gather index
    ref = _export(narrow, x)
    for b in (1, 3):
        xb = torch.randn(b, 5, 8)
        torch.testing.assert_close(gm(xb), ref(xb), rtol=0, atol=0)


def test_repair_refuses_unrelated_failures():
    gm = _export(Flatten(12).eval(), torch.randn(2, 5, 8))
    set_param(gm, "lin.weight", torch.randn(12, 7))         # wrong INPUT width: not a stale output width
    with pytest.raises(RuntimeError, match="fails after width surgery"):
        repair_widths(gm, torch.randn(1, 5, 8), {12, 6})
