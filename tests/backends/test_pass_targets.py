"""Every pass builds for every target: pass x (cpu run, cuda build, arm build) on the tiny ViT.

cpu: the TVM output matches the eager pruned graph. cuda: the build succeeds without a GPU, every
kernel got a schedule (a dlight rule that fails on a function hands it to another rule, which the
module records), and the CUDA source has kernels. arm: the exported library is an AArch64 ELF.
"""

import pytest
import torch

import vitprune
from vitprune.backends.tvm.backend import TvmBackend

from tests.backends.conftest import needs_cross, tiny_vit

X1 = torch.randn(1, 3, 32, 32)
CALIB = torch.randn(8, 3, 32, 32)
PASSES = {
    "explicit-attention": ["explicit-attention"],
    "zero-tprune": ["zero-tprune:prune_blocks=0,keep=0.5"],
    "tome": ["tome:r=4"],
    "snp": ["snp:ratio=0.3,augment=none"],
    "head-prune": ["head-prune:heads=1"],
    "snp-then-zero-tprune": ["snp:ratio=0.3,augment=none", "zero-tprune:prune_blocks=0,keep=0.5"],
}
EM_AARCH64 = 183  # ELF e_machine of AArch64


@pytest.fixture(scope="module", params=list(PASSES), ids=list(PASSES))
def pruned(request):
    """(pass name, the eager pruned graph) on the tiny ViT."""
    c = vitprune.compile(tiny_vit(), passes=PASSES[request.param], example_inputs=X1, calibration=CALIB,
                         progress=False)
    return request.param, c.graph_module


@pytest.mark.slow
def test_cpu_runs_and_matches_eager(pruned):
    name, gm = pruned
    mod = TvmBackend().lower(gm, (X1,), target="cpu", use_cache=False, progress=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (mod(x) - gm(x)).abs().max().item() < 1e-4, name


@pytest.mark.slow
def test_cuda_builds_with_every_function_scheduled(pruned, recwarn):
    name, gm = pruned
    mod = TvmBackend().lower(gm, (X1,), target="cuda", progress=False)
    assert mod.family == "cuda" and mod.cuda_source.count("__global__") >= 5, name
    for fn, failed, err, used in mod.schedule_fallbacks:  # what replaced a failing rule is named
        assert failed != used and used in ("GEMV", "Reduction", "GeneralReduction", "Fallback") and err


class _PairwiseRank(torch.nn.Module):
    """Zero-TPrune's token ranking before 2026-12 (pairwise comparisons summed per token): the fused
    ``expand_dims ... greater/equal ... sum`` kernel on which dlight's GEMV rule matches and then asserts."""

    def forward(self, x):                                   # x [B, 3, H, W] -> [B, H*W] ranks, 0 = largest
        s = x.mean(1).flatten(1)
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        pos = torch.arange(s.shape[-1])
        before = (pos.unsqueeze(0) < pos.unsqueeze(1)).unsqueeze(0)
        return ((sj > si) | ((sj == si) & before)).to(torch.float32).sum(-1)


def test_cuda_build_moves_past_a_dlight_rule_that_raises():
    """The kernel GEMV asserts on still builds: the next rule schedules it, and the module names both."""
    gm = torch.fx.symbolic_trace(_PairwiseRank())
    x = torch.randn(1, 3, 4, 5)
    mod = TvmBackend().lower(gm, (x,), target="cuda", progress=False)
    assert any(f[1] == "GEMV" and "AssertionError" in f[2] for f in mod.schedule_fallbacks), mod.schedule_fallbacks
    for fn, failed, err, used in mod.schedule_fallbacks:
        assert failed != used and used in ("Reduction", "GeneralReduction", "Fallback"), (fn, failed, used)


@needs_cross
@pytest.mark.slow
def test_arm_exports_an_aarch64_library(pruned, tmp_path):
    name, gm = pruned
    mod = TvmBackend().lower(gm, (X1,), target="arm", progress=False)
    path = mod.export(str(tmp_path / "m.so"))
    head = open(path, "rb").read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == EM_AARCH64, name


def test_board_presets():
    from vitprune.backends.tvm.targets import BOARDS, export_kwargs, resolve_target, target_family

    rpi4 = resolve_target("rpi4")
    assert target_family(rpi4) == "arm" and rpi4.attrs["mcpu"] == "cortex-a72"
    assert resolve_target("rpi5", mcpu="cortex-a55").attrs["mcpu"] == "cortex-a55"  # overrides win
    orin = resolve_target("jetson-orin")
    assert target_family(orin) == "cuda" and orin.attrs["arch"] == "sm_87"
    assert orin.host.attrs["mtriple"] == "aarch64-linux-gnu" and orin.host.attrs["mcpu"] == BOARDS["jetson-orin"][2]
    if __import__("shutil").which("aarch64-linux-gnu-g++"):
        assert "fcompile" in export_kwargs("cuda", orin)   # the Jetson's host code is cross-compiled
    assert export_kwargs("cuda", resolve_target("cuda")) == {}
