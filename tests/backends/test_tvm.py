"""TVM backend: builds for cpu / cuda / arm, parity, pruned-graph ops, export/load and bad input."""

import hashlib
import json
import os
import subprocess

import pytest
import torch

import vitprune
from vitprune.backends.tvm.backend import TvmBackend
from vitprune.errors import BackendError
from vitprune.ir.capture import export_program

from tests.backends.conftest import needs_cross

X1 = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def tvm_vit(vit):
    return vitprune.compile(vit, passes=["explicit-attention"], backend="tvm", example_inputs=X1, progress=False,
                            use_cache=False)


def test_tvm_cpu_parity_and_batch_chunks(vit, tvm_vit):
    """Compiled at batch 1 (static); batches of 3 run as zero-padded chunks and match eager."""
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = vit(x)
    out = tvm_vit(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 10)
    assert (out - ref).abs().max().item() < 1e-4
    assert tvm_vit.lowered.fast_math  # on by default on CPU, parity still within 1e-4


def test_tvm_pruned_graph_ops(pruned_gm):
    """explicit softmax + power iteration + log + topk + gather + cat (TVM_NOTES §3) import and match."""
    gm, model = pruned_gm
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.topk.default", "aten.gather.default", "aten.cat.default", "aten.log.default"} <= ops
    x = torch.randn(2, 3, 32, 32)
    mod = TvmBackend().lower(export_program(model, (x,)).module(), (x,), use_cache=False, fast_math=False)
    with torch.no_grad():
        ref = model(x)
    assert (mod(x) - ref).abs().max().item() < 1e-4


def test_unsupported_op_is_named():
    class StableSort(torch.nn.Module):
        def forward(self, img):
            s = img.mean((1, 2))
            return torch.sort(s, dim=1, stable=True).values

    x = torch.randn(1, 3, 8, 8)
    gm = export_program(StableSort(), (x,)).module()
    with pytest.raises(BackendError, match=r"cannot lower aten op 'sort.stable'"):
        TvmBackend().lower(gm, (x,), use_cache=False)


def test_export_load_so(tvm_vit, tmp_path):
    path = str(tmp_path / "m.so")
    tvm_vit.export(path)
    man = json.load(open(path + ".json"))
    assert man["target_family"] == "cpu" and man["input_shape"] == [1, 3, 32, 32]
    assert man["passes"][0]["pass"] == "explicit-attention" and man["target"]["kind"] == "llvm"
    assert sorted(os.listdir(tmp_path)) == ["m.so", "m.so.json"]  # no temporaries left
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(vitprune.load(path, trust=True)(x), tvm_vit(x))


def test_load_corrupt_and_foreign(tvm_vit, tmp_path):
    foreign = tmp_path / "foreign.so"
    foreign.write_bytes(b"\x7fELF not really")
    with pytest.raises(BackendError, match="no valid vitprune manifest"):
        vitprune.load(str(foreign), trust=True)
    good = str(tmp_path / "m.so")
    tvm_vit.export(good)
    corrupt = tmp_path / "c.so"
    corrupt.write_bytes(b"garbage" * 100)
    man = json.load(open(good + ".json"))
    man["files"] = {"c.so": hashlib.sha256(corrupt.read_bytes()).hexdigest()}
    (tmp_path / "c.so.json").write_text(json.dumps(man))
    with pytest.raises(BackendError, match="not a loadable TVM library"):
        vitprune.load(str(corrupt), trust=True)


def test_cuda_builds_without_gpu_and_refuses_to_load(vit, tmp_path):
    c = vitprune.compile(vit, backend="tvm", target="cuda", arch="sm_80", example_inputs=X1, progress=False,
                         check_parity=False)
    path = str(tmp_path / "m.so")
    c.export(path)
    src = open(path + ".cu").read()
    assert "__global__" in src and json.load(open(path + ".json"))["target"]["arch"] == "sm_80"
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("a CUDA GPU is present: loading works here")
    with pytest.raises(BackendError, match="no CUDA GPU"):
        vitprune.load(path, trust=True)
    with pytest.raises(BackendError, match="cannot run this TVM module here"):
        c(X1)


def test_bad_cuda_arch_before_build(vit):
    with pytest.raises(BackendError, match="sm_13"):
        vitprune.compile(vit, backend="tvm", target="cuda", arch="sm_13", example_inputs=X1, progress=False)


@needs_cross
def test_arm_writes_aarch64_elf(vit, tmp_path):
    c = vitprune.compile(vit, backend="tvm", target="arm", example_inputs=X1, progress=False, check_parity=False)
    path = str(tmp_path / "m.so")
    c.export(path)
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # e_machine EM_AARCH64
    if subprocess.run(["which", "file"], capture_output=True).returncode == 0:
        assert "ARM aarch64" in subprocess.run(["file", path], capture_output=True, text=True).stdout
    with pytest.raises(BackendError, match="aarch64"):
        vitprune.load(path, trust=True)


def test_arm_missing_cross_compiler_leaves_nothing(vit, tmp_path, monkeypatch):
    c = vitprune.compile(vit, backend="tvm", target="arm", example_inputs=X1, progress=False, check_parity=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BackendError, match="gcc-aarch64-linux-gnu"):
        c.export(str(tmp_path / "m.so"))
    assert os.listdir(tmp_path) == []


def test_unknown_option(vit):
    with pytest.raises(BackendError, match="unknown option"):
        vitprune.compile(vit, backend="tvm", example_inputs=X1, progress=False, bogus=1)
