"""The artefact trust model (docs/security.md): formats that run code load only with trust=True, and
every artefact's files must match the SHA-256 its manifest records."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import zipfile

import pytest
import torch

import vitprune
from vitprune.errors import UntrustedArtefactError

X1 = torch.randn(1, 3, 32, 32)


class _Payload:
    """Unpickling this creates the folder ``marker``: stands in for any code an attacker runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _crafted_pt2(good: str, bad: str, marker: str, forge_manifest: bool) -> None:
    """Copy a real vitprune .pt2 and add a legacy weights member that torch.export's loader unpickles with
    weights_only=False; optionally recompute the manifest's hashes so they match the crafted file."""
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    with zipfile.ZipFile(good) as src:
        members = {i.filename: src.read(i) for i in src.infolist()}
    root = next(iter(members)).split("/")[0]
    members[f"{root}/data/weights/model.pt"] = buf.getvalue()
    man_name = f"{root}/extra/vitprune_manifest.json"
    if forge_manifest:
        man = json.loads(members[man_name])
        man["files"] = {k: hashlib.sha256(v).hexdigest() for k, v in members.items() if k != man_name}
        members[man_name] = json.dumps(man).encode()
    with zipfile.ZipFile(bad, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)


@pytest.fixture(scope="module")
def pt2(vit, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pt2") / "m.pt2")
    vitprune.compile(vit, example_inputs=X1, progress=False).export(path)
    return path


def test_crafted_pt2_runs_payload_only_when_trusted(pt2, tmp_path):
    marker = str(tmp_path / "marker")
    bad = str(tmp_path / "bad.pt2")
    _crafted_pt2(pt2, bad, marker, forge_manifest=True)
    with pytest.raises(UntrustedArtefactError, match=r"can run code.*trust=True"):
        vitprune.load(bad)
    assert not os.path.exists(marker)
    # the crafted file is a real attack: torch's own loader runs the payload
    with pytest.raises(Exception):
        torch.export.load(bad)
    assert os.path.exists(marker)


def test_pt2_edited_after_export_is_refused_even_when_trusted(pt2, tmp_path):
    marker = str(tmp_path / "marker")
    bad = str(tmp_path / "bad.pt2")
    _crafted_pt2(pt2, bad, marker, forge_manifest=False)  # the manifest of the genuine export
    with pytest.raises(UntrustedArtefactError, match=r"not in the manifest .*model\.pt"):
        vitprune.load(bad, trust=True)
    assert not os.path.exists(marker)


def test_pt2_changed_weight_refused(pt2, tmp_path, vit):
    with zipfile.ZipFile(pt2) as src:
        members = {i.filename: src.read(i) for i in src.infolist()}
    name = next(n for n in members if n.endswith("weights/weight_0"))
    members[name] = bytes(len(members[name]))  # zeroed weights: same size, different bytes
    bad = str(tmp_path / "w.pt2")
    with zipfile.ZipFile(bad, "w") as dst:
        for n, data in members.items():
            dst.writestr(n, data)
    with pytest.raises(UntrustedArtefactError, match="changed .*weight_0"):
        vitprune.load(bad, trust=True)
    with torch.no_grad():  # the genuine file loads and runs when trusted
        assert torch.allclose(vitprune.load(pt2, trust=True)(X1), vit(X1), atol=1e-5)


def test_pt2_without_manifest_hashes_refused(vit, tmp_path):
    path = str(tmp_path / "plain.pt2")
    torch.export.save(torch.export.export(vit, (X1,)), path)  # not written by vitprune
    with pytest.raises(UntrustedArtefactError, match="records no SHA-256"):
        vitprune.load(path, trust=True)


def _payload_so(path: str, marker: str) -> None:
    src = path + ".c"
    with open(src, "w") as f:
        f.write('#include <sys/stat.h>\n__attribute__((constructor)) static void run(void) '
                f'{{ mkdir("{marker}", 0700); }}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", path, src], check=True)
    os.remove(src)


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the payload library")


@needs_gcc
def test_so_with_forged_manifest_refused(tmp_path):
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "m.so")
    _payload_so(path, marker)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    forged = {"format": "vitprune", "backend": "tvm", "target_family": "cpu", "input_shape": [1, 3, 32, 32]}
    with open(path + ".json", "w") as f:  # a hand-written manifest, even one with the right hash
        json.dump(dict(forged, files={"m.so": digest}), f)
    with pytest.raises(UntrustedArtefactError, match=r"native code.*--trust"):
        vitprune.load(path)
    assert not os.path.exists(marker)
    with open(path + ".json", "w") as f:  # no hash, or the hash of another file: refused even when trusted
        json.dump(forged, f)
    with pytest.raises(UntrustedArtefactError, match="records no SHA-256"):
        vitprune.load(path, trust=True)
    with open(path + ".json", "w") as f:
        json.dump(dict(forged, files={"m.so": "0" * 64}), f)
    with pytest.raises(UntrustedArtefactError, match="changed m.so"):
        vitprune.load(path, trust=True)
    assert not os.path.exists(marker)


@needs_gcc
def test_so_replaced_after_export_refused(vit, tmp_path):
    path = str(tmp_path / "m.so")
    vitprune.compile(vit, backend="tvm", example_inputs=X1, progress=False, use_cache=False).export(path)
    assert set(json.load(open(path + ".json"))["files"]) == {"m.so"}
    marker = str(tmp_path / "marker")
    _payload_so(path, marker)  # the genuine manifest, another library
    with pytest.raises(UntrustedArtefactError, match="changed m.so"):
        vitprune.load(path, trust=True)
    assert not os.path.exists(marker)


def test_onnx_needs_no_trust_but_is_checked(vit, tmp_path):
    import onnx

    path = str(tmp_path / "m.onnx")
    c = vitprune.compile(vit, backend="onnx", example_inputs=X1, progress=False)
    c.export(path)
    assert torch.allclose(vitprune.load(path)(X1), c(X1))
    m = onnx.load(path)
    init = m.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(m, path)
    with pytest.raises(UntrustedArtefactError, match="changed graph"):
        vitprune.load(path)


def test_pt2_with_duplicate_members_refused(pt2, tmp_path):
    import warnings

    bad = str(tmp_path / "dup.pt2")
    with zipfile.ZipFile(pt2) as src:
        infos = [(i, src.read(i)) for i in src.infolist()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(bad, "w") as dst:
            name = next(i.filename for i, _ in infos if i.filename.endswith("weights/weight_0"))
            dst.writestr(name, b"\0" * 128)  # a first copy a reader might take, then the genuine archive
            for i, data in infos:
                dst.writestr(i, data)
    with pytest.raises(UntrustedArtefactError, match="two members of one name"):
        vitprune.load(bad, trust=True)
