"""Atomic writes (vitprune/files.py): all or nothing, temporaries of killed writers cleaned on the next write."""

import os
import subprocess
import sys

import pytest
import torch

import vitprune
from tests.backends.conftest import tiny_vit
from vitprune.errors import DataError
from vitprune.files import atomic_write, left_by_dead_process, temporary_name


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_failure_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_errors_name_the_path_not_the_temporary(tmp_path):
    target = tmp_path / "missing" / "x.onnx"
    with pytest.raises(DataError) as e:
        with atomic_write(str(target)):
            pass
    assert str(target) in str(e.value) and ".tmp-" not in str(e.value)


def test_killed_exports_are_cleaned_on_the_next_write(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    left = [f".m.pt2.tmp-{dead}.pt2", f".tmp-{dead}-m.onnx", f".other.so.tmp-{dead}.so"]  # new and old naming
    kept = [f".n.pt2.tmp-{alive}.pt2", "notes.tmp-1.txt.keep"]
    for name in left + kept:
        (tmp_path / name).write_bytes(b"partial")
    assert all(left_by_dead_process(n) for n in left) and not left_by_dead_process(kept[0])
    c = vitprune.compile(tiny_vit(), example_inputs=torch.randn(1, 3, 32, 32), progress=False)
    c.export(str(tmp_path / "m.pt2"))
    assert sorted(os.listdir(tmp_path)) == sorted(["m.pt2", *kept])


def test_a_killed_export_leaves_only_a_temporary_the_next_one_removes(tmp_path):
    """A real writer killed with SIGKILL in the middle of writing."""
    code = ("import os, sys, time\n"
            "from vitprune.files import atomic_write\n"
            "with atomic_write(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'w').write('half'); print('writing', flush=True); time.sleep(60)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "x.json")], stdout=subprocess.PIPE, cwd=root,
                         env=dict(os.environ, PYTHONPATH=root))
    assert p.stdout.readline().strip() == b"writing"
    p.kill()
    p.wait()
    assert os.listdir(tmp_path) == [os.path.basename(temporary_name(str(tmp_path / "x.json"))).replace(
        f"-{os.getpid()}", f"-{p.pid}")]
    with atomic_write(str(tmp_path / "y.json")) as tmp:
        open(tmp, "w").write("{}")
    assert os.listdir(tmp_path) == ["y.json"]
