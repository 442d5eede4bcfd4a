"""The vitprune command line: the main job on real data and one-line errors for bad input."""

import json
import os

import pytest
import safetensors.torch
import timm

from tests.conftest import DEIT_T_WEIGHTS, IMAGENET_SAMPLE
from vitprune.cli import main


def test_info(capsys):
    assert main(["info", "--model", "deit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "12 attention sites" in out and "| 11 | blocks.11 | fused | sdpa | 3 | 64 | 197 | 1 | 192 | 768 |" in out


@pytest.mark.slow
def test_eval_real_subset(tmp_path, capsys):
    if not (os.path.isfile(DEIT_T_WEIGHTS) and os.path.isdir(IMAGENET_SAMPLE)):
        pytest.skip("real weights/images not available")
    out_json = tmp_path / "out.json"
    rc = main(["eval", "--model", "deit_tiny_patch16_224", "--weights", DEIT_T_WEIGHTS, "--data", IMAGENET_SAMPLE,
               "--limit", "20", "--batch-size", "10", "--json", str(out_json), "--no-progress",
               "--pass", "explicit-attention"])
    assert rc == 0
    d = json.loads(out_json.read_text())
    for key in ("top1", "top1_agreement", "gmacs", "gmacs_base", "images", "throughput_img_s"):
        assert key in d
    assert d["images"] == 20 and d["top1_agreement"] == 100.0 and d["gmacs"] == pytest.approx(1.254, abs=1e-3)
    assert d["top1"] >= 70.0  # real DeiT-T is right on ~79 % of these images


def error_of(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitprune: error: ") and "\n" not in err
    return err


def test_unknown_model(capsys):
    assert "unknown timm model name 'deit_tinyy'" in error_of(["info", "--model", "deit_tinyy"], capsys)


def test_mismatched_weights(tmp_path, capsys):
    path = tmp_path / "small.safetensors"
    safetensors.torch.save_file(timm.create_model("deit_small_patch16_224").state_dict(), str(path))
    err = error_of(["info", "--model", "deit_tiny_patch16_224", "--weights", str(path)], capsys)
    assert "do not match" in err and "shape mismatch ['cls_token (1, 1, 384) vs (1, 1, 192)'" in err


def test_pickle_weights_refused(tmp_path, capsys):
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    assert "never loads pickle" in error_of(["info", "--model", "deit_tiny_patch16_224", "--weights", str(path)], capsys)


def test_data_folder_errors(tmp_path, capsys):
    (tmp_path / "n01440764_x.JPEG").write_bytes(b"")
    err = error_of(["eval", "--model", "deit_tiny_patch16_224", "--data", str(tmp_path)], capsys)
    assert "no synsets.txt" in err
    (tmp_path / "synsets.txt").write_text("n09999999 nothing\n")
    assert "no labelled images" in error_of(["eval", "--model", "deit_tiny_patch16_224", "--data", str(tmp_path)], capsys)


def test_bad_pass_specs(capsys):
    assert "unknown pass 'zap'" in error_of(["info", "--model", "deit_tiny_patch16_224", "--pass", "zap"], capsys)
    err = error_of(["info", "--model", "deit_tiny_patch16_224", "--pass", "explicit-attention:foo=1"], capsys)
    assert "has no option 'foo'" in err
