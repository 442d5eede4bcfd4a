"""compile(): report, user model untouched, export/load round trip in a fresh process."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import vitprune
from vitprune.errors import BackendError, InvalidPassConfigError


@pytest.fixture(scope="module")
def tiny():
    return timm.create_model("deit_tiny_patch16_224").eval()


def test_report_and_batch_independence(tiny):
    compiled = vitprune.compile(tiny, passes=["explicit-attention"])
    r = compiled.report
    assert r.gmacs_before == pytest.approx(1.254, abs=1e-3) and r.gmacs_after == pytest.approx(r.gmacs_before)
    assert r.passes[0]["pass"] == "explicit-attention" and len(r.passes[0]["blocks_rewritten"]) == 12
    assert json.loads(r.to_json())["backend"] == "torch"
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        batched = compiled(x)
        alone = torch.cat([compiled(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_user_model_is_not_mutated(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    modules = [type(m) for m in tiny.modules()]
    vitprune.compile(tiny, passes=["explicit-attention"])
    assert [type(m) for m in tiny.modules()] == modules
    assert all(tiny.blocks[i].attn.fused_attn == timm.layers.use_fused_attn() for i in range(12))
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


@pytest.mark.slow
def test_export_load_fresh_process(tiny, tmp_path):
    compiled = vitprune.compile(tiny, passes=["explicit-attention"])
    path = str(tmp_path / "m.pt2")
    compiled.export(path)
    assert os.listdir(tmp_path) == ["m.pt2"], "no temporary files left behind"
    x = torch.randn(2, 3, 224, 224)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(compiled(x), tmp_path / "ref.pt")
    # a fresh interpreter that never imports timm or the model code
    code = (
        "import sys, torch, vitprune\n"
        f"m = vitprune.load({path!r}, trust=True)\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "assert 'timm' not in sys.modules, 'loading must not need model code'\n"
        "print(m.manifest['passes'][0]['pass'], float((m(x) - ref).abs().max()))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-2000:]
    name, diff = out.stdout.split()
    assert name == "explicit-attention" and float(diff) == 0.0


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        vitprune.load(str(tmp_path / "missing.pt2"))
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not an archive")
    with pytest.raises(BackendError, match="not a readable torch.export archive"):
        vitprune.load(str(bad), trust=True)
    other = tmp_path / "m.xyz"
    other.write_bytes(b"")
    with pytest.raises(BackendError, match="unknown artefact type"):
        vitprune.load(str(other))


def test_unknown_backend_and_pass(tiny):
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        vitprune.compile(tiny, backend="nope")
    with pytest.raises(InvalidPassConfigError, match="unknown pass"):
        vitprune.compile(tiny, passes=["nope"])
