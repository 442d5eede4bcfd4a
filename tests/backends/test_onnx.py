"""ONNX backend: parity with eager, dynamic batch, export with manifest, reload (also in a fresh process)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import vitprune
from vitprune.backends.onnx import OnnxBackend
from vitprune.errors import BackendError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_onnx_matches_eager_and_batch_is_dynamic(vit):
    x = torch.randn(1, 3, 32, 32)
    c = vitprune.compile(vit, passes=["explicit-attention"], backend="onnx", example_inputs=x, progress=False,
                         threads=1)
    xb = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = vit(xb)
    out = c(xb)
    assert out.shape == (5, 10) and isinstance(out, torch.Tensor)
    assert (out - ref).abs().max().item() < 1e-4
    assert c.lowered.session.get_session_options().intra_op_num_threads == 1


def test_onnx_pruned_graph(pruned_gm):
    gm, model = pruned_gm
    mod = OnnxBackend().lower(gm, (torch.randn(1, 3, 32, 32),))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    assert (mod(x) - ref).abs().max().item() < 1e-4
    ops = {n.op_type for n in mod.model.graph.node}
    assert "TopK" in ops and "Softmax" in ops


@pytest.mark.slow
def test_export_and_reload_in_fresh_process(vit, tmp_path):
    """ONNX and .pt2 exports reload with no model code in a new interpreter and give the same outputs."""
    x = torch.randn(2, 3, 32, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    outs = {}
    for backend, suffix in (("onnx", ".onnx"), ("torch", ".pt2")):
        c = vitprune.compile(vit, passes=["explicit-attention"], backend=backend,
                             example_inputs=torch.randn(1, 3, 32, 32), progress=False)
        path = str(tmp_path / f"m{suffix}")
        c.export(path)
        outs[suffix] = (path, c(x).numpy())
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    code = ("import sys, numpy as np, torch, vitprune\n"
            "x = torch.from_numpy(np.load(sys.argv[1]))\n"
            "for p in sys.argv[2:]:\n"
            "    np.save(p + '.out.npy', vitprune.load(p, trust=True)(x).numpy())\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), *(p for p, _ in outs.values())],
                   check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    for path, expected in outs.values():
        np.testing.assert_array_equal(np.load(path + ".out.npy"), expected)


def test_onnx_manifest(vit, tmp_path):
    import onnx

    c = vitprune.compile(vit, passes=["explicit-attention"], backend="onnx",
                         example_inputs=torch.randn(1, 3, 32, 32), progress=False)
    path = c.export(str(tmp_path / "m.onnx"))
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    man = json.loads(props["vitprune_manifest"])
    assert man["backend"] == "onnx" and man["passes"][0]["pass"] == "explicit-attention"
    assert vitprune.load(path).manifest["input_shape"] == [1, 3, 32, 32]


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all \x00\x01", b"\x08\x07" * 50])
def test_corrupt_onnx(tmp_path, content):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(BackendError, match="not a valid ONNX model"):
        vitprune.load(str(p))


def test_unknown_option(vit):
    with pytest.raises(BackendError, match="unknown option"):
        OnnxBackend().lower(None, (torch.randn(1, 3, 32, 32),), target="cuda")


def test_spin_option_reaches_the_session(vit):
    """``spin=False`` turns off onnxruntime's spin-waiting of idle intra-op threads (what the sweep times
    with); the default leaves onnxruntime's own default (no entry); a non-bool is refused in one line."""
    x = torch.randn(1, 3, 32, 32)
    quiet = vitprune.compile(vit, backend="onnx", example_inputs=x, progress=False, threads=2, spin=False)
    default = vitprune.compile(vit, backend="onnx", example_inputs=x, progress=False, threads=2)
    key = "session.intra_op.allow_spinning"
    assert quiet.lowered.session.get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(Exception, match="does not have configuration"):      # onnxruntime's default kept
        default.lowered.session.get_session_options().get_session_config_entry(key)
    with torch.no_grad():
        assert (quiet(x) - vit(x)).abs().max().item() < 1e-4
    with pytest.raises(BackendError, match="spin must be true or false"):
        OnnxBackend().lower(None, (x,), spin="no")
