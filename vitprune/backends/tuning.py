"""MetaSchedule autotuning with an on-disk cache (TVM_NOTES.md §2; DESIGN.md "Caches are explicit").

A tuning database lives in ``$VITPRUNE_CACHE/tuning/<key>/`` (default ``~/.cache/vitprune``), where
``key`` hashes the target JSON (kind, mcpu, num-cores, ...) and the workload: the structural hash of
the Relax module being tuned (so the model, input shape, pruning config / kept-token counts and the
fast-math flag all enter it). ``meta.json`` in that folder records the TVM version and the budget.
A cache from another TVM version is re-tuned with a warning (schedules are not portable across
versions). Tuning writes into a temporary folder that is renamed into place only when complete,
so an interrupted tune leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import BackendError

DEFAULT_TRIALS_PER_TASK = 32
META = "meta.json"
RECORDS = "database_tuning_record.json"
WORKLOADS = "database_workload.json"


def cache_root() -> str:
    """The cache folder: ``$VITPRUNE_CACHE`` or ``~/.cache/vitprune``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("VITPRUNE_CACHE", "~/.cache/vitprune")))


def prepare_for_tuning(mod, target):
    """The module MetaSchedule tunes: the same preprocessing ``static_shape_tuning`` applies
    (DecomposeOpsForInference, CanonicalizeBindings, the ``zero`` pipeline), TVM_NOTES.md §2."""
    import tvm
    from tvm import relax

    with target:
        return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                         relax.transform.CanonicalizeBindings(),
                                         relax.get_pipeline("zero")])(mod)


def cache_key(tuned_mod, target, op_names: Optional[Sequence[str]] = None) -> str:
    """sha256 (first 16 hex digits) of the target JSON and the workload: the structural hashes of the
    tuning tasks' PrimFuncs (shapes and ops, not weight values, so a re-trained or re-pruned model with
    the same shapes hits the same cache)."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from .targets import target_json

    tasks = ms.relax_integration.extract_tasks(tuned_mod, target)
    hashes = sorted(str(tvm_ffi.structural_hash(t.dispatched[0])) for t in tasks)
    h = hashlib.sha256()
    h.update(target_json(target).encode())
    h.update(",".join(hashes).encode())
    if op_names:  # a partial tune is its own database
        h.update(("ops:" + ",".join(sorted(op_names))).encode())
    return h.hexdigest()[:16]


@dataclass
class TuneResult:
    """Where the database is, whether it came from the cache, and what tuning cost."""

    work_dir: str
    cache_hit: bool
    num_tasks: int
    trials: int
    seconds: float


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _progress_thread(path: str, total: int, stop: threading.Event, progress: bool):
    """Show measured trials (lines of the records file) against the budget, every 2 s."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="tuning (trials measured)", unit="trial", disable=not progress)
    done = 0
    while not stop.wait(2.0):
        n = _count_lines(path)
        if n > done:
            bar.update(n - done)
            done = n
    n = _count_lines(path)
    bar.update(max(0, n - done))
    bar.close()


def _remove_stale(root: str) -> None:
    """Delete ``<key>.tmp-<pid>`` folders left by tuning processes that died (crash, kill -9)."""
    import psutil

    for name in os.listdir(root):
        pid = name.rpartition(".tmp-")[2]
        if ".tmp-" in name and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_meta(work_dir: str) -> dict:
    try:
        with open(os.path.join(work_dir, META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def check_database(work_dir: str) -> dict:
    """Metadata of a complete tuning database at ``work_dir`` made by this TVM version.

    Raises:
        BackendError: missing/incomplete database, or one made with another TVM version
            (says to re-tune, or to delete the folder).
    """
    import tvm

    meta = read_meta(work_dir)
    if not meta or not os.path.exists(os.path.join(work_dir, RECORDS)):
        raise BackendError(f"{work_dir} is not a complete vitprune tuning database (no {META} or {RECORDS}); "
                           f"run `vitprune tune` to create it")
    if meta.get("tvm_version") != tvm.__version__:
        raise BackendError(f"tuning database {work_dir} was made with TVM {meta.get('tvm_version')}, this is TVM "
                           f"{tvm.__version__}; schedules do not carry over: re-tune (delete the folder or run "
                           f"`vitprune tune`, which re-tunes it)")
    return meta


def tune(mod, target, trials_per_task: int = DEFAULT_TRIALS_PER_TASK, cache_dir: Optional[str] = None,
         op_names: Optional[Sequence[str]] = None, progress: bool = True, force: bool = False) -> TuneResult:
    """Tune ``mod`` (a Relax IRModule, weights embedded) for ``target`` unless the cache has it.

    The global budget is ``trials_per_task × number of tasks``; MetaSchedule's gradient task
    scheduler hands the trials to the tasks where the time goes (at most ``2 × trials_per_task``
    for one task). Elementwise tasks finish after one trial, so their share goes to the matmuls.

    Args:
        mod: Relax module as imported (before legalization); it is prepared like ``static_shape_tuning``.
        target: a ``tvm.target.Target`` (CPU or ARM llvm; tuning measures on this machine, so only
            the host CPU target can be tuned here).
        trials_per_task: budget per task (>= 1).
        cache_dir: cache root (default :func:`cache_root`).
        op_names: restrict tuning to tasks whose name contains one of these (others get no schedule).
        progress: tqdm bar of measured trials.
        force: re-tune even on a cache hit.

    Returns:
        :class:`TuneResult`; ``work_dir`` is what :func:`compile_tuned` reads.

    Raises:
        BackendError: a non-host target, a bad budget, or a MetaSchedule failure.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .targets import target_family, target_json
    from .tvm_fastbuild import fast_build

    if not isinstance(trials_per_task, int) or trials_per_task < 1:
        raise BackendError(f"trials_per_task must be a positive integer, got {trials_per_task!r}")
    if target_family(target) != "cpu":
        raise BackendError(f"autotuning measures on this machine, so it needs the host CPU target; got "
                           f"{target_family(target)!r} (tune on the device, or build untuned)")
    t0 = time.time()
    tmod = prepare_for_tuning(mod, target)
    key = cache_key(tmod, target, op_names)
    root = os.path.join(cache_dir or cache_root(), "tuning")
    work_dir = os.path.join(root, key)
    meta = read_meta(work_dir)
    if meta and not force:
        if meta.get("tvm_version") == tvm.__version__ and os.path.exists(os.path.join(work_dir, RECORDS)):
            return TuneResult(work_dir, True, meta.get("num_tasks", 0), 0, time.time() - t0)
        warnings.warn(f"tuning cache {work_dir} was made with TVM {meta.get('tvm_version')}, this is TVM "
                      f"{tvm.__version__}; re-tuning", stacklevel=2)
    tasks = ms.relax_integration.extract_tasks(tmod, target)
    if op_names:
        tasks = [t for t in tasks if any(o in t.task_name for o in op_names)]
    n_tasks = max(1, len(tasks))
    total = trials_per_task * n_tasks
    os.makedirs(root, exist_ok=True)
    _remove_stale(root)
    tmp = f"{work_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    stop = threading.Event()
    watcher = threading.Thread(target=_progress_thread, args=(os.path.join(tmp, RECORDS), total, stop, progress),
                               daemon=True)
    watcher.start()
    try:
        ms.relax_integration.tune_relax(
            mod=tmod, params={}, target=target, work_dir=tmp, max_trials_global=total,
            max_trials_per_task=2 * trials_per_task, op_names=list(op_names) if op_names else None,
            num_trials_per_iter=min(64, max(trials_per_task, 2)),
            builder=ms.builder.LocalBuilder(f_build=fast_build, max_workers=os.cpu_count(), timeout_sec=60),
            runner=ms.runner.LocalRunner(timeout_sec=30))
        stop.set()
        watcher.join()
        trials = _count_lines(os.path.join(tmp, RECORDS))
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"tvm_version": tvm.__version__, "target": json.loads(target_json(target)),
                       "trials_per_task": trials_per_task, "num_tasks": n_tasks, "trials": trials,
                       "op_names": list(op_names) if op_names else None,
                       "seconds": round(time.time() - t0, 1)}, f, indent=1)
        shutil.rmtree(work_dir, ignore_errors=True)
        os.replace(tmp, work_dir)
    except Exception as exc:
        raise BackendError(f"MetaSchedule tuning failed: {type(exc).__name__}: {str(exc).strip()[:300]}") from exc
    finally:
        stop.set()
        shutil.rmtree(tmp, ignore_errors=True)
    return TuneResult(work_dir, False, n_tasks, trials, time.time() - t0)


def apply_database(mod, target, work_dir: str):
    """Lower ``mod`` with the schedules of the tuning database at ``work_dir`` (no new trials):
    ``static_shape_tuning`` with ``total_trials=0`` (TVM_NOTES.md §2 "cache-hit path").

    Raises:
        BackendError: the database is missing, incomplete or from another TVM version.
    """
    from tvm import relax

    check_database(work_dir)
    with target:
        return relax.get_pipeline("static_shape_tuning", total_trials=0, target=target, work_dir=work_dir,
                                  cpu_weight_prepack=False)(mod)


def lookup(mod, target, cache_dir: Optional[str] = None,
           op_names: Optional[Sequence[str]] = None) -> Optional[TuneResult]:
    """The cached tuning of ``mod`` for ``target`` made by this TVM version, or None (no tuning)."""
    import tvm

    t0 = time.time()
    tmod = prepare_for_tuning(mod, target)
    work_dir = os.path.join(cache_dir or cache_root(), "tuning", cache_key(tmod, target, op_names))
    meta = read_meta(work_dir)
    if meta.get("tvm_version") == tvm.__version__ and os.path.exists(os.path.join(work_dir, RECORDS)):
        return TuneResult(work_dir, True, meta.get("num_tasks", 0), 0, time.time() - t0)
    return None
