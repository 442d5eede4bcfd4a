"""Compiled and loaded modules are safe to call from several Python threads."""

import threading

import pytest
import torch

import vitprune

THREADS, CALLS = 4, 50


def _hammer(fn, inputs):
    """Call ``fn`` CALLS times from each of THREADS threads (thread t on ``inputs[t]``); outputs per thread."""
    outs = [[] for _ in range(THREADS)]
    errors = []
    start = threading.Barrier(THREADS)

    def work(t):
        try:
            start.wait()
            for _ in range(CALLS):
                outs[t].append(fn(inputs[t]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return outs


@pytest.fixture(scope="module")
def tvm_compiled(vit):
    return vitprune.compile(vit, backend="tvm", example_inputs=torch.randn(1, 3, 32, 32), progress=False,
                            use_cache=False)


@pytest.mark.parametrize("which", ["compiled", "loaded"])
def test_tvm_module_from_threads(which, tvm_compiled, tmp_path):
    if which == "loaded":
        path = str(tmp_path / "m.so")
        tvm_compiled.export(path)
        module = vitprune.load(path, trust=True)
    else:
        module = tvm_compiled
    torch.manual_seed(1)
    inputs = [torch.randn(1 + t % 2, 3, 32, 32) for t in range(THREADS)]  # batch 2 runs as two chunks
    single = [module(x) for x in inputs]  # one thread's outputs
    outs = _hammer(module, inputs)
    for t in range(THREADS):
        assert len(outs[t]) == CALLS and all(torch.equal(o, single[t]) for o in outs[t])
