"""Target resolution and its errors (no builds)."""

import json

import pytest

from vitprune.backends.tvm.targets import find_cross_compiler, resolve_target, target_family, target_json, target_spec
from vitprune.backends.tvm.backend import TvmBackend
from vitprune.errors import BackendError


def test_cpu_target_is_host_llvm_with_threads(monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    from tvm.target import codegen

    t = resolve_target("cpu")
    d = json.loads(target_json(t))
    assert d["kind"] == "llvm" and d["num-cores"] == 2 and d["mcpu"] == codegen.llvm_get_system_cpu()
    assert target_family(t) == "cpu"


def test_arm_and_cuda_targets():
    arm = resolve_target("arm")
    assert target_family(arm) == "arm" and "arm_cpu" in json.loads(target_json(arm))["keys"]
    assert bool(arm.attrs["feature.has_asimd"])  # NEON
    cuda = resolve_target("cuda", arch="sm_90")
    assert target_family(cuda) == "cuda" and cuda.attrs["arch"] == "sm_90" and cuda.host is not None


@pytest.mark.parametrize("arch", ["sm_13", "foo", "sm_", "compute_80"])
def test_bad_cuda_arch(arch):
    with pytest.raises(BackendError, match="not an NVIDIA compute capability"):
        target_spec("cuda", arch=arch)


def test_unknown_target_name():
    with pytest.raises(BackendError, match="unknown target 'tpu'.*cpu, cuda, arm"):
        resolve_target("tpu")


def test_target_kind_tvm_does_not_know():
    with pytest.raises(BackendError, match="TVM rejected target.*not defined"):
        TvmBackend.resolve({"kind": "foo"})


def test_missing_cross_compiler_names_package():
    with pytest.raises(BackendError, match="apt-get install -y gcc-aarch64-linux-gnu g\\+\\+-aarch64-linux-gnu"):
        find_cross_compiler("aarch64-no-such-g++")
