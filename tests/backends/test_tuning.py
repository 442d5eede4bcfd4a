"""MetaSchedule tuning with the cache: one tiny real tune (1 trial per task), then cache hits."""

import json
import os
import time

import pytest
import torch

from vitprune.backends import tuning
from vitprune.backends.tvm import TvmBackend
from vitprune.errors import BackendError
from vitprune.ir.capture import export_program


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 16)).eval()


@pytest.mark.slow
def test_tune_then_cache_hit(cache_dir):
    """~1 min on an idle 2-core machine (worker start-up dominates); 1 task, 1 trial."""
    x = torch.randn(1, 3, 4, 4)
    m = _mlp(0)
    gm = export_program(m, (x,)).module()
    first = TvmBackend().lower(gm, (x,), tune=True, trials=1, progress=False, tune_ops=["matmul"])
    tr = first.tuning
    assert not tr.cache_hit and tr.trials >= 1 and tr.work_dir.startswith(str(cache_dir))
    meta = json.load(open(os.path.join(tr.work_dir, "meta.json")))
    import tvm

    assert meta["tvm_version"] == tvm.__version__ and meta["target"]["kind"] == "llvm"
    assert not [d for d in os.listdir(os.path.dirname(tr.work_dir)) if ".tmp" in d]
    with torch.no_grad():
        assert (first(x) - m(x)).abs().max().item() < 1e-5
    records = open(os.path.join(tr.work_dir, tuning.RECORDS)).read()

    # same shapes, other weights: the cache key ignores weight values -> hit, no new trials
    m2 = _mlp(1)
    t0 = time.time()
    second = TvmBackend().lower(export_program(m2, (x,)).module(), (x,), tune=True, trials=1, progress=False,
                                tune_ops=["matmul"])
    assert second.tuning.cache_hit and second.tuning.work_dir == tr.work_dir and second.tuning.trials == 0
    assert time.time() - t0 < 60
    assert open(os.path.join(tr.work_dir, tuning.RECORDS)).read() == records
    with torch.no_grad():
        assert (second(x) - m2(x)).abs().max().item() < 1e-5
    # compile without tune=True also uses the cache
    assert TvmBackend().lower(gm, (x,), progress=False, tune_ops=["matmul"]).tuning.cache_hit

    # a database from another TVM version: an explicit error when applied, a re-tune warning from tune()
    meta["tvm_version"] = "0.1.0"
    json.dump(meta, open(os.path.join(tr.work_dir, "meta.json"), "w"))
    with pytest.raises(BackendError, match="made with TVM 0.1.0.*re-tune"):
        tuning.check_database(tr.work_dir)
    assert TvmBackend().lower(gm, (x,), progress=False, tune_ops=["matmul"]).tuning is None  # lookup ignores it


def test_tuning_rejects_bad_budget_and_foreign_target(cache_dir):
    from vitprune.backends.targets import resolve_target

    with pytest.raises(BackendError, match="positive integer"):
        tuning.tune(None, resolve_target("cpu"), trials_per_task=0)
    with pytest.raises(BackendError, match="host CPU target"):
        tuning.tune(None, resolve_target("arm"), trials_per_task=1)


def test_incomplete_database_is_refused(tmp_path):
    with pytest.raises(BackendError, match="not a complete vitprune tuning database"):
        tuning.check_database(str(tmp_path))
