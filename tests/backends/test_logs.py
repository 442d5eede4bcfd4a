"""TVM's output goes to the log under the cache, not to the user's terminal (backends/tvm/logs.py)."""

import ctypes
import warnings

import pytest
import torch

import vitprune
from vitprune.backends.tvm import logs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VITPRUNE_VERBOSE", raising=False)
    return tmp_path / "cache"


def _c_write(fd: int, text: str) -> None:
    """Write below Python's sys.stderr, as TVM's C++ LOG does."""
    data = text.encode()
    ctypes.CDLL(None).write(fd, data, len(data))


def test_fd_output_goes_to_log_and_problems_are_summarised(cache, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with logs.quiet("test"):
            _c_write(2, "[12:00:00] executable.cc:340: Warning: Scope Loaded:global\n" * 3)
            _c_write(1, "Warning: Fast mode segfaults when there are out-of-bounds indices\n")
            _c_write(2, "[ERROR] Task #3 failed: build error\n")
            print("a python print inside TVM code")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    text = (cache / "logs" / "tvm.log").read_text()
    assert text.count("Scope Loaded") == 3 and "a python print" in text and "Task #3 failed" in text
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "1 problem line" in msgs[0] and "Task #3 failed" in msgs[0]


def test_verbose_lets_it_through(cache, capfd, monkeypatch):
    monkeypatch.setenv("VITPRUNE_VERBOSE", "1")
    with logs.quiet("test"):
        _c_write(2, "Scope Loaded:global\n")
    assert "Scope Loaded" in capfd.readouterr().err


def test_problem_filter():
    lines = ["Warning: Fast mode segfaults when there are out-of-bounds indices", "Scope Loaded:global",
             "INFO Logging directory: /x", "[ERROR] failed to build task 2", "all fine"]
    assert logs.problems("\n".join(lines)) == ["[ERROR] failed to build task 2"]


def test_load_so_prints_nothing(vit, cache, tmp_path, capfd):
    path = str(tmp_path / "m.so")
    x = torch.randn(1, 3, 32, 32)
    vitprune.compile(vit, backend="tvm", example_inputs=x, progress=False, use_cache=False).export(path)
    capfd.readouterr()
    m = vitprune.load(path, trust=True)
    m(x)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert "Scope Loaded" in (cache / "logs" / "tvm.log").read_text()


def test_quiet_from_several_threads_restores_the_terminal(cache, capfd):
    import threading

    barrier = threading.Barrier(3)

    def work():
        with logs.quiet("test"):
            barrier.wait()
            _c_write(2, "Scope Loaded:thread\n")
            barrier.wait()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _c_write(2, "after\n")
    out, err = capfd.readouterr()
    assert err == "after\n" and (cache / "logs" / "tvm.log").read_text().count("Scope Loaded:thread") == 3
