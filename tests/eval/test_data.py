"""The image-folder loader and its bad inputs."""

import os
import shutil

import pytest
import torch

from tests.conftest import IMAGENET_SAMPLE
from vitprune.errors import DataError
from vitprune.eval import ImageFolder, evaluate, make_loader
from vitprune.data import read_synsets
from vitprune.models import eval_transform, load_model


@pytest.fixture()
def small_folder(tmp_path):
    if not os.path.isdir(IMAGENET_SAMPLE):
        pytest.skip("image folder not available")
    names = sorted(f for f in os.listdir(IMAGENET_SAMPLE) if f.endswith(".JPEG"))[:3]
    for n in names:
        shutil.copy(os.path.join(IMAGENET_SAMPLE, n), tmp_path / n)
    shutil.copy(os.path.join(IMAGENET_SAMPLE, "synsets.txt"), tmp_path / "synsets.txt")
    return tmp_path, names


def test_labels_follow_synsets(small_folder):
    root, names = small_folder
    classes = read_synsets(str(root / "synsets.txt"))
    ds = ImageFolder(str(root), eval_transform(load_model("deit_tiny_patch16_224")))
    assert [label for _, label in ds.samples] == [classes[n.split("_")[0]] for n in names]
    x, y = ds[0]
    assert x.shape == (3, 224, 224) and y == classes[names[0].split("_")[0]]


def test_unreadable_image_is_skipped_and_counted(small_folder):
    root, names = small_folder
    (root / "n01440764_broken.JPEG").write_bytes(b"not a jpeg")
    model = load_model("deit_tiny_patch16_224")
    ds = ImageFolder(str(root), eval_transform(model))
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        res = evaluate(model, make_loader(ds, batch_size=2), progress=False)
    assert res["images"] == 3 and res["skipped"] == 1


def test_files_restrict_the_folder_to_one_side_of_a_split(small_folder):
    root, names = small_folder
    t = lambda im: torch.zeros(1)                                            # noqa: E731
    ds = ImageFolder(str(root), t, files=[os.path.join(str(root), names[2]), os.path.join(str(root), names[0])])
    assert [os.path.basename(p) for p, _ in ds.samples] == [names[0], names[2]]   # file order, not the list's
    ds = ImageFolder(str(root), t, files=[str(root / n) for n in names], exclude=[str(root / names[1])])
    assert [os.path.basename(p) for p, _ in ds.samples] == [names[0], names[2]]
    with pytest.raises(DataError, match="no labelled images"):
        ImageFolder(str(root), t, files=[str(root / "elsewhere.JPEG")])


def test_missing_synsets(tmp_path):
    (tmp_path / "n01440764_x.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match="no synsets.txt"):
        ImageFolder(str(tmp_path), transform=lambda im: torch.zeros(1))


def test_no_images(tmp_path):
    (tmp_path / "synsets.txt").write_text("n01440764 tench\n")
    with pytest.raises(DataError, match="no labelled images"):
        ImageFolder(str(tmp_path), transform=lambda im: torch.zeros(1))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(str(tmp_path / "nope"), transform=lambda im: torch.zeros(1))
