"""Bad input a new user gives (issue 18): one clear line, a non-zero exit, nothing half-written; and the
warnings for results that would otherwise be silently wrong."""

import argparse
import json
import math
import os
import re
import socket
import warnings

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

import vitprune
from tests.backends.conftest import tiny_vit
from tests.conftest import DEIT_T_WEIGHTS, IMAGENET_SAMPLE
from vitprune.cli import calibration_from_args, main
from vitprune.models import load_model, load_weights
from vitprune.data import ImageFolder
from vitprune.errors import BackendError, DataError, InvalidPassConfigError, UnsupportedModelError

DEIT = "deit_tiny_patch16_224"


def error_of(argv, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitprune: error: ") and "\n" not in err, err
    return err


def usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# --- export paths -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,out,expect", [
    ("torch", "x.onnx", "backend 'torch' writes .pt2 files, not '.onnx'"),
    ("onnx", "x.pt2", "backend 'onnx' writes .onnx files, not '.pt2'"),
    ("tvm", "x.onnx", "use backend 'onnx' to write .onnx"),
    ("torch", "x", "has no suffix"),
])
def test_export_suffix_must_match_backend(backend, out, expect, tmp_path, capsys):
    err = error_of(["export", "--model", DEIT, "--backend", backend, "--out", str(tmp_path / out)], capsys)
    assert expect in err and not os.listdir(tmp_path)


def test_export_unwritable_paths(tmp_path, capsys):
    err = error_of(["export", "--model", DEIT, "--out", str(tmp_path / "missing" / "x.pt2")], capsys)
    assert "does not exist" in err and ".tmp" not in err
    (tmp_path / "d.pt2").mkdir()
    assert "is a folder" in error_of(["export", "--model", DEIT, "--out", str(tmp_path / "d.pt2")], capsys)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert "not writable" in error_of(["export", "--model", DEIT, "--out", str(ro / "x.pt2")], capsys)


def test_api_export_refuses_wrong_suffix(tmp_path):
    c = vitprune.compile(tiny_vit(), example_inputs=torch.randn(1, 3, 32, 32), progress=False)
    with pytest.raises(BackendError, match="writes .pt2 files"):
        c.export(str(tmp_path / "m.onnx"))
    with pytest.raises(DataError, match="does not exist"):
        c.export(str(tmp_path / "nope" / "m.pt2"))
    assert not os.listdir(tmp_path)


# --- numbers on the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--limit", "-3"), ("--limit", "0"), ("--threads", "0"),
                                        ("--batch-size", "0"), ("--calib-images", "-1")])
def test_positive_ints(flag, value, capsys):
    err = usage_error(["eval", "--model", DEIT, "--data", ".", flag, value], capsys)
    assert f"argument {flag}: must be a positive integer, got {value}" in err


# --- data ---------------------------------------------------------------------------------------------------

def _folder(root, n=6, corrupt=(), synsets=("n01440764", "n01443537")):
    root.mkdir(exist_ok=True)
    (root / "synsets.txt").write_text("".join(f"{s}\n" for s in synsets))
    for i in range(n):
        path = root / f"n01440764_{i:02d}.png"
        if i in corrupt:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(np.full((40, 40, 3), 10 * i, np.uint8)).save(path)
    return str(root)


def test_unreadable_images_error(tmp_path, capsys):
    data = _folder(tmp_path / "d", n=3, corrupt=(0, 1, 2), synsets=["n01440764"] + [f"n{i:08d}" for i in range(999)])
    err = error_of(["eval", "--model", DEIT, "--data", data, "--no-progress"], capsys)
    assert "no readable image to evaluate" in err and "3 unreadable" in err


def test_partial_synsets_refused(tmp_path, capsys):
    data = _folder(tmp_path / "d", n=2)
    err = error_of(["eval", "--model", DEIT, "--data", data, "--no-progress"], capsys)
    assert "lists 2 classes but the model predicts 1000" in err


def _args(**kw):
    base = dict(passes=[], calib=None, calib_images=64)
    return argparse.Namespace(**dict(base, **kw))


def _transform(img):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), np.float32)).permute(2, 0, 1)


def test_calibration_held_out_from_same_folder(tmp_path):
    data = _folder(tmp_path / "d", n=6, corrupt=(1,))
    with pytest.warns(UserWarning, match="skipped 1 unreadable calibration image"):
        images, held = calibration_from_args(_args(calib=data, calib_images=3), _transform, data=data)
    assert images.shape == (2, 3, 8, 8) and [os.path.basename(p) for p in held] == [
        "n01440764_00.png", "n01440764_01.png", "n01440764_02.png"]
    ds = ImageFolder(data, _transform, exclude=held)
    assert [os.path.basename(p) for p, _ in ds.samples] == ["n01440764_03.png", "n01440764_04.png", "n01440764_05.png"]
    other = _folder(tmp_path / "c", n=2)
    with pytest.warns(UserWarning, match="gave 2 readable images, fewer than --calib-images 5"):
        images, held = calibration_from_args(_args(calib=other, calib_images=5), _transform, data=data)
    assert len(images) == 2 and held == []  # another folder: nothing held out


def test_calibrating_pass_without_images_says_how(tmp_path, capsys):
    with pytest.raises(DataError, match=r"pass 'head-prune' needs calibration images: give --calib DIR"):
        calibration_from_args(_args(passes=["head-prune:heads=2"]), _transform)
    data = _folder(tmp_path / "d", n=2)
    with pytest.warns(UserWarning, match=r"calibrates on calib=.*the folder being evaluated"):
        calibration_from_args(_args(passes=[f"snp:calib={data},target_gmacs=1.0"]), _transform, data=data)


def test_viz_corrupt_image(tmp_path, capsys):
    bad = tmp_path / "x.JPEG"
    bad.write_bytes(b"\xff\xd8 broken")
    err = error_of(["viz", "--model", DEIT, "--image", str(bad), "--pass", "tome:r=4", "--out",
                    str(tmp_path / "o.png")], capsys)
    assert "not a readable image" in err and not (tmp_path / "o.png").exists()


def test_nan_weights_refused(tmp_path):
    m = tiny_vit()
    state = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    state["blocks.0.mlp.fc1.weight"][0, 0] = math.nan
    path = str(tmp_path / "w.safetensors")
    safetensors.torch.save_file(state, path)
    with pytest.raises(DataError, match=r"NaN or infinite values in 1 tensor\(s\), e.g. 'blocks.0.mlp.fc1.weight'"):
        load_weights(tiny_vit(), path)


# --- the cache ----------------------------------------------------------------------------------------------

def test_tune_cache_is_a_file(tmp_path, capsys, monkeypatch):
    f = tmp_path / "cache"
    f.write_text("")
    monkeypatch.setenv("VITPRUNE_CACHE", str(f))
    err = error_of(["tune", "--model", DEIT], capsys)
    assert "is a file, not a folder" in err


# --- pass configs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["snp:ridge=nan", "snp:mix=nan;1;1", "snp:target_gmacs=inf", "tome:inflection=nan",
                                  "zero-tprune:keep=0.9;nan"])
def test_non_finite_options_refused(spec):
    from vitprune.passes.base import parse_pass_spec

    with pytest.raises(InvalidPassConfigError, match=r"option \w+=.* must be a finite number"):
        parse_pass_spec(spec)


def test_non_finite_refused_for_pass_objects():
    from vitprune.passes.base import PASS_REGISTRY

    snp = PASS_REGISTRY["snp"](target_gmacs=float("nan"))
    with pytest.raises(InvalidPassConfigError, match="finite"):
        vitprune.compile(tiny_vit(), [snp], example_inputs=torch.randn(1, 3, 32, 32))


def test_json_configs():
    from vitprune.passes.base import Pass

    with pytest.raises(InvalidPassConfigError, match="not valid JSON"):
        Pass.from_json('{"pass": "tome", ')
    with pytest.raises(InvalidPassConfigError, match="must be a JSON object .* got a list"):
        Pass.from_json('[{"pass": "tome"}]')


# --- models -------------------------------------------------------------------------------------------------

def test_misspelt_model_suggests_the_right_one(capsys):
    err = error_of(["info", "--model", "deit_tinyy"], capsys)
    assert "deit_tiny_patch16_224" in err.split("similar names:")[1]


def test_pretrained_without_hub(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    err = error_of(["info", "--model", DEIT, "--pretrained"], capsys)
    assert "cannot reach the Hugging Face hub" in err and "--weights" in err


def test_pretrained_model_without_weights(capsys):
    name = next(m for m in ("vit_relpos_small_patch16_rpn_224", "vit_small_patch16_18x2_224")
                if timm.is_model(m) and not timm.list_pretrained(m + "*"))
    assert "timm has no pretrained weights" in error_of(["info", "--model", name, "--pretrained"], capsys)


def test_weights_and_pretrained_exclusive(capsys):
    assert "not allowed with argument" in usage_error(["info", "--model", DEIT, "--weights", "w", "--pretrained"],
                                                      capsys)


def test_random_weights_warn_and_are_recorded(tmp_path):
    with pytest.warns(UserWarning, match="random weights: accuracy is meaningless"):
        assert main(["export", "--model", DEIT, "--out", str(tmp_path / "m.pt2")]) == 0
    with pytest.warns(UserWarning, match="random weights"):
        assert main(["eval", "--model", DEIT, "--data", str(tmp_path / "none")]) == 2  # warned before the data error
    c = vitprune.compile(load_model(DEIT), progress=False)
    assert c.report.weights == "random" and c.report.to_dict()["weights"] == "random"


@pytest.mark.parametrize("name,spec,family", [
    ("vit_relpos_small_patch16_224", "zero-tprune:target_gmacs=3.0", "relative-position-bias ViT"),
    ("swin_tiny_patch4_window7_224", "head-prune:heads=1", "Swin (windowed attention)"),
    ("swin_tiny_patch4_window7_224", "tome:r=4", "Swin (windowed attention)"),
])
def test_families_refused_up_front(name, spec, family):
    model = timm.create_model(name).eval()
    with pytest.raises(UnsupportedModelError, match=rf"pass '{spec.split(':')[0]}' does not support .*{re.escape(family)}"):
        vitprune.compile(model, [spec], progress=False)


# --- run time -----------------------------------------------------------------------------------------------

def test_runtime_shape_error_says_expected_and_given():
    c = vitprune.compile(tiny_vit(), example_inputs=torch.randn(1, 3, 32, 32), progress=False)
    for bad in (torch.randn(1, 3, 40, 40), torch.randn(1, 1, 32, 32), torch.randn(3, 32, 32)):
        with pytest.raises(BackendError, match=re.escape(f"takes images [B, 3, 32, 32], got input of shape {list(bad.shape)}")):
            c(bad)


def test_prefix_tokens_after_pruning():
    from vitprune.ir import find_attention_sites

    c = vitprune.compile(tiny_vit(), ["tome:r=4"], example_inputs=torch.randn(1, 3, 32, 32), progress=False)
    sites = find_attention_sites(c.graph_module)
    assert sites[1].num_tokens < sites[0].num_tokens and [s.num_prefix_tokens for s in sites] == [1, 1]


def test_report_summary_not_cut_mid_value():
    from vitprune.api import _summary

    info = {f"k{i}": list(range(20)) for i in range(10)}
    text = _summary(info)
    assert text.endswith("more in report.to_json())") and "…" in text
    kept = text.split(" … ")[0].split(" ")
    assert all(json.loads(part.split("=", 1)[1]) == list(range(20)) for part in kept)


# --- eval: the unpruned row beside the pruned one -----------------------------------------------------------

@pytest.mark.slow
def test_eval_prints_unpruned_row(tmp_path, capsys):
    if not (os.path.isfile(DEIT_T_WEIGHTS) and os.path.isdir(IMAGENET_SAMPLE)):
        pytest.skip("real weights/images not available")
    out_json = tmp_path / "out.json"
    assert main(["eval", "--model", DEIT, "--weights", DEIT_T_WEIGHTS, "--data", IMAGENET_SAMPLE, "--limit", "10",
                 "--batch-size", "10", "--no-progress", "--pass", "tome:r=8", "--json", str(out_json)]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"| {DEIT}")]
    d = json.loads(out_json.read_text())
    assert len(rows) == 2 and "- (unpruned)" in rows[0] and "1.00x" in rows[0] and "tome:r=8" in rows[1]
    assert d["gmacs"] < d["gmacs_base"] and d["speedup"] == pytest.approx(d["throughput_img_s"] / d["throughput_base_img_s"])
    assert f"{d['top1_reference']:.1f}" in rows[0] and d["weights"] == DEIT_T_WEIGHTS


def test_snp_runs_on_relative_position_vits():
    """SNP keeps every head, so the per-head relative-position bias needs no change: supported."""
    m = timm.create_model("test_vit_relpos").eval()
    x = torch.randn(1, 3, 160, 160)
    c = vitprune.compile(m, ["snp:ratio=0.5,augment=none,calib_images=4"], example_inputs=x,
                         calibration=torch.randn(4, 3, 160, 160), progress=False, check_parity=False)
    assert c.report.gmacs_after < 0.6 * c.report.gmacs_before and c(x).shape == (1, m.num_classes)
    with pytest.raises(UnsupportedModelError, match="head-prune"):
        vitprune.compile(m, ["head-prune:heads=1"], example_inputs=x, progress=False)
