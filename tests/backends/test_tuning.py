"""MetaSchedule tuning with the shared per-target cache: a tiny real tune (1 trial per task), cache
hits, reuse of tasks across graphs, and the trial plan."""

import json
import os
import time

import pytest
import torch

from vitprune.backends.tvm import tuning
from vitprune.backends.tvm.backend import TvmBackend
from vitprune.errors import BackendError
from vitprune.ir.capture import export_program


def _mlp(seed, extra=False):
    """One 768x512 linear (untuned ~0.3 ms: above the plan's threshold); ``extra`` adds a second one."""
    torch.manual_seed(seed)
    layers = [torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 512)]
    if extra:
        layers += [torch.nn.Linear(512, 384)]
    return torch.nn.Sequential(*layers).eval()


@pytest.mark.slow
def test_tune_then_cache_hit(cache_dir, tmp_path, monkeypatch):
    """~1 min on an idle 2-core machine (worker start-up dominates); 1 task, 1 trial.

    The untuned time of every task is fixed at 1 s, so the plan always tunes the matmul and the
    merge always keeps its record: the test does not depend on how loaded the machine is (a
    tuned record is kept only when it beats the untuned time, which one trial under load may not)."""
    from vitprune.backends.tvm import tuning_plan

    monkeypatch.setattr(tuning_plan, "measure_untuned", lambda func, target, *args, **kwargs: 1000.0)
    x = torch.randn(1, 3, 16, 16)
    m = _mlp(0)
    gm = export_program(m, (x,)).module()
    # a handler without a name on MetaSchedule's logger (pytest >= 9 attaches its capture handler to it once
    # an earlier tune made it non-propagating) broke MetaSchedule's logger set-up; it must stay attached
    import logging

    ms_logger, stray = logging.getLogger("tvm.s_tir.meta_schedule"), logging.NullHandler()
    ms_logger.addHandler(stray)
    try:
        first = TvmBackend().lower(gm, (x,), tune=True, trials=1, progress=False, tune_ops=["matmul"])
        assert stray in ms_logger.handlers
    finally:
        ms_logger.removeHandler(stray)
    tr = first.tuning
    assert not tr.cache_hit and tr.trials >= 1 and tr.work_dir.startswith(str(cache_dir))
    meta = json.load(open(os.path.join(tr.work_dir, "meta.json")))
    import tvm

    assert meta["tvm_version"] == tvm.__version__ and meta["target"]["kind"] == "llvm"
    assert not [d for d in os.listdir(os.path.dirname(tr.work_dir)) if ".tmp" in d]
    with torch.no_grad():
        assert (first(x) - m(x)).abs().max().item() < 1e-5
    records = open(os.path.join(tr.work_dir, tuning.RECORDS)).read()
    libs = os.path.join(tr.work_dir, "libs")
    assert first.library_path is None and len(os.listdir(libs)) == 1  # the tuned build was stored

    # same shapes, other weights: the cache key ignores weight values -> hit, no new trials
    m2 = _mlp(1)
    t0 = time.time()
    second = TvmBackend().lower(export_program(m2, (x,)).module(), (x,), tune=True, trials=1, progress=False,
                                tune_ops=["matmul"])
    assert second.tuning.cache_hit and second.tuning.work_dir == tr.work_dir and second.tuning.trials == 0
    assert time.time() - t0 < 60
    assert open(os.path.join(tr.work_dir, tuning.RECORDS)).read() == records
    # other weights are another library: built (not loaded), and it computes m2, not m
    assert second.library_path is None and len(os.listdir(libs)) == 2
    with torch.no_grad():
        assert (second(x) - m2(x)).abs().max().item() < 1e-5
    # the same graph again, without tune=True: the library cache (a fresh capture of the same model)
    again = TvmBackend().lower(export_program(m, (x,)).module(), (x,), progress=False, tune_ops=["matmul"])
    assert again.tuning.cache_hit and again.library_path is not None
    with torch.no_grad():
        assert torch.equal(again(x), first(x))
    out = str(tmp_path / "again.so")
    again.export(out)
    import vitprune

    assert torch.equal(vitprune.load(out, trust=True)(x), first(x))

    # a bigger graph on the same target: only its new task is tuned, the first one's schedule is reused
    m3 = _mlp(2, extra=True)
    third = TvmBackend().lower(export_program(m3, (x,)).module(), (x,), tune=True, trials=1, progress=False,
                               tune_ops=["matmul"])
    assert third.tuning.work_dir == tr.work_dir and third.tuning.num_tasks == 1 and third.tuning.trials >= 1
    manifest = json.load(open(os.path.join(tr.work_dir, tuning.MANIFEST)))
    assert len(manifest) == 2 and all(v["trials"] >= 1 for v in manifest.values())
    assert open(os.path.join(tr.work_dir, tuning.RECORDS)).read().startswith(records)
    with torch.no_grad():
        assert (third(x) - m3(x)).abs().max().item() < 1e-5
    # the database changed: the first graph's stored library is stale and is rebuilt
    assert TvmBackend().lower(gm, (x,), progress=False, tune_ops=["matmul"]).library_path is None

    # a database from another TVM version: an explicit error when applied, a re-tune warning from tune()
    meta["tvm_version"] = "0.1.0"
    json.dump(meta, open(os.path.join(tr.work_dir, "meta.json"), "w"))
    with pytest.raises(BackendError, match="made with TVM 0.1.0.*re-tune"):
        tuning.check_database(tr.work_dir)
    assert TvmBackend().lower(gm, (x,), progress=False, tune_ops=["matmul"]).tuning is None  # lookup and library cache ignore it


def test_library_fingerprint_covers_code_weights_constants_and_shape():
    from vitprune.backends.tvm.libcache import graph_fingerprint

    x = torch.randn(1, 3, 16, 16)
    fp = graph_fingerprint(export_program(_mlp(0), (x,)).module(), (x,))
    assert graph_fingerprint(export_program(_mlp(0), (x,)).module(), (x,)) == fp  # fresh capture, same model
    assert graph_fingerprint(export_program(_mlp(1), (x,)).module(), (x,)) != fp  # weights
    assert graph_fingerprint(export_program(_mlp(0, extra=True), (x,)).module(), (x,)) != fp  # graph
    x2 = torch.randn(2, 3, 16, 16)
    assert graph_fingerprint(export_program(_mlp(0), (x,)).module(), (x2,)) != fp  # static input shape

    class Const(torch.nn.Module):  # a tensor constant that is neither parameter nor buffer
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, t):
            return t * self.c

    g1, g2 = (export_program(Const(torch.full((16,), v)), (x,)).module() for v in (1.0, 2.0))
    assert graph_fingerprint(g1, (x,)) != graph_fingerprint(g2, (x,))


def test_library_key_follows_the_records_content_not_their_mtime(tmp_path):
    from vitprune.backends.tvm.targets import resolve_target
    from vitprune.backends.tvm.libcache import library_key

    target = resolve_target("cpu")
    assert library_key("fp", target, str(tmp_path), False) is None          # no records: nothing cached
    records = tmp_path / tuning.RECORDS
    records.write_text('{"a": 1}\n')
    key = library_key("fp", target, str(tmp_path), False)
    os.utime(records, ns=(1, 1))                                            # copied: new mtime, same bytes
    assert library_key("fp", target, str(tmp_path), False) == key
    records.write_text('{"a": 2}\n')                                       # same size, other schedule
    os.utime(records, ns=(1, 1))
    assert library_key("fp", target, str(tmp_path), False) != key
    assert library_key("fp", target, str(tmp_path), True) != library_key("fp", target, str(tmp_path), False)


def test_tuning_rejects_bad_budget_and_foreign_target(cache_dir):
    from vitprune.backends.tvm.targets import resolve_target

    with pytest.raises(BackendError, match="positive integer"):
        tuning.tune(None, resolve_target("cpu"), trials_per_task=0)
    with pytest.raises(BackendError, match="host CPU target"):
        tuning.tune(None, resolve_target("arm"), trials_per_task=1)


def test_incomplete_database_is_refused(tmp_path):
    with pytest.raises(BackendError, match="not a complete vitprune tuning database"):
        tuning.check_database(str(tmp_path))


def test_plan_spends_trials_where_the_untuned_time_is():
    from vitprune.backends.tvm.tuning_plan import TaskCost, plan_trials

    costs = [TaskCost("big", "a", 4, 1e8, 25.0), TaskCost("mid", "b", 1, 1e6, 1.0),
             TaskCost("tiny", "c", 12, 0.0, 0.001), TaskCost("unmeasured", "d", 1, 0.0, float("nan"))]
    plan = plan_trials(costs, trials=16, min_ms=0.05, min_trials=4, max_trials=64)
    assert plan["c"] == 0                                   # 12 x 1 us < 0.05 ms: left untuned
    # budget 16 x 3 tuned tasks over sqrt(100 ms), sqrt(1 ms) and the unmeasurable task, which is tuned
    # like the largest measured one rather than left to chance: 48 * 10 / 21 = 22.9
    assert plan["a"] == plan["d"] == 23 and plan["b"] == 4  # 48 * 1 / 21 = 2.3, raised to min_trials
    assert plan_trials(costs, trials=100, max_trials=64)["a"] == 100  # max_trials never below the mean
    assert plan_trials(costs, trials=40, max_trials=64)["a"] == 57
    # sqrt proportionality between two uncapped tasks
    plan = plan_trials([TaskCost("x", "x", 1, 0, 4.0), TaskCost("y", "y", 1, 0, 1.0)], trials=30,
                       min_trials=1, max_trials=1000)
    assert plan == {"x": 40, "y": 20}
    assert plan_trials([TaskCost("t", "t", 1, 0, 0.0)], trials=8) == {"t": 0}


def test_merge_keeps_only_schedules_faster_than_the_untuned_code(tmp_path):
    """A tuned record slower than the task's untuned time must not reach the shared database (the
    database would otherwise apply the best of a bad lot)."""
    import tvm
    import tvm_ffi
    from tvm import te
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    a = te.placeholder((4,), name="A")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((4,), lambda i: a[i] + 1, name="B")])})
    target = tvm.target.Target({"kind": "llvm"})
    (tmp_path / "src").mkdir()
    src = ms.database.JSONDatabase(work_dir=str(tmp_path / "src"))
    wl = src.commit_workload(mod)
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    for secs in (2e-3, 5e-4):                                   # 2 ms and 0.5 ms
        src.commit_tuning_record(ms.database.TuningRecord(Schedule(mod).trace, wl, [secs], target, args))
    key = str(tvm_ffi.structural_hash(mod))

    n, kept = tuning._merge(str(tmp_path / "src"), str(tmp_path / "dst"), {key: 1.0})
    assert n == 2 and kept == {key}
    got = ms.database.JSONDatabase(work_dir=str(tmp_path / "dst")).get_all_tuning_records()
    assert [float(r.run_secs[0]) for r in got] == [5e-4]

    n, kept = tuning._merge(str(tmp_path / "src"), str(tmp_path / "none"), {key: 0.1})  # untuned: 0.1 ms
    assert n == 2 and kept == set()
    assert not ms.database.JSONDatabase(work_dir=str(tmp_path / "none")).get_all_tuning_records()
