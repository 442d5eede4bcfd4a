"""MetaSchedule autotuning with an on-disk cache shared by every graph of a target (TVM_NOTES.md §2;
DESIGN.md "Caches are explicit").

One tuning database per target lives in ``$VITPRUNE_CACHE/tuning/<key>/`` (default
``~/.cache/vitprune``), where ``key`` hashes the target JSON (kind, mcpu, num-cores, ...) and the TVM
version. MetaSchedule records are matched per task by the task's structural hash (shapes and ops, not
weight values), so every graph compiled for that target reuses the schedules of every task tuned
before: a pruned model reuses the unpruned model's schedules for the blocks before the first pruning
layer, and a second ``tune`` of the same graph measures nothing. ``tasks.json`` lists the tasks already
handled (tuned, or measured too cheap to tune, see :mod:`vitprune.backends.tvm.tuning_plan`) and
``graphs.json`` the whole graphs fully covered (a second tune of one skips task extraction); a tuned
schedule enters the database only if it is faster than the task's untuned code. ``meta.json``
records the TVM version. A tune writes into a temporary folder and merges into the shared database
only when complete (under a file lock, files replaced atomically), so an interrupted tune leaves the
cache as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from ...errors import BackendError
from ...files import left_by_dead_process, write_text

DEFAULT_TRIALS_PER_TASK = 32
MANIFEST = "tasks.json"
GRAPHS = "graphs.json"
META = "meta.json"
RECORDS = "database_tuning_record.json"
WORKLOADS = "database_workload.json"
FAILED_RUN_SECS = 1e9  # MetaSchedule's placeholder time of a failed run is 1e10 s


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
    """Delete ``<key>.tmp-<pid>`` (tuning) and ``<key>.merge-<pid>`` (staging of :func:`_merge`)
    folders left by tuning processes that died (crash, kill -9)."""
    for name in os.listdir(root):
        if left_by_dead_process(name, ".tmp-") or left_by_dead_process(name, ".merge-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_meta(work_dir: str) -> dict:
    """``meta.json`` of the tuning database at ``work_dir`` (TVM version, target), or ``{}`` if absent
    or unreadable."""
    return _read_json(os.path.join(work_dir, META))


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


def database_dir(target, cache_dir: Optional[str] = None) -> str:
    """The tuning database folder of ``target``: ``<cache>/tuning/<sha256(target JSON, TVM version)[:16]>``."""
    import tvm

    from .targets import target_json

    h = hashlib.sha256(f"{target_json(target)}|tvm {tvm.__version__}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir or cache_root(), "tuning", h)


def graph_tasks(mod, target, op_names: Optional[Sequence[str]] = None) -> list:
    """MetaSchedule tasks of ``mod`` (prepared like ``static_shape_tuning``), optionally only those whose
    name contains one of ``op_names``."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(prepare_for_tuning(mod, target), target)
    return [t for t in tasks if any(o in t.task_name for o in op_names)] if op_names else tasks


def graph_key(mod, op_names: Optional[Sequence[str]] = None) -> str:
    """Structural hash of a whole imported module (weights included; 0.1 s for DeiT-T) and of
    ``op_names``: a graph whose tasks are all in the database is recorded under this key, so a second
    tune or a cached compile of it skips task extraction (several seconds)."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod)}|{','.join(sorted(op_names or []))}"


def _remember_graph(work_dir: str, key: str, n_tasks: int) -> None:
    graphs = _read_json(os.path.join(work_dir, GRAPHS))
    if key not in graphs:
        graphs[key] = n_tasks
        _write_json(os.path.join(work_dir, GRAPHS), graphs)


def task_key(task) -> str:
    """Structural hash of a task's PrimFunc module: what MetaSchedule matches records on."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(task.dispatched[0]))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_json(path: str, value) -> None:
    write_text(path, json.dumps(value, indent=1), "tuning database file")


class _Lock:
    """Exclusive ``flock`` on ``<work_dir>.lock`` (concurrent tunes of one target take turns)."""

    def __init__(self, work_dir: str):
        os.makedirs(os.path.dirname(work_dir), exist_ok=True)
        self.path = f"{work_dir}.lock"

    def __enter__(self):
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _merge(src_dir: str, work_dir: str, untuned_ms: Optional[dict] = None) -> tuple[int, set]:
    """Append the records of the database at ``src_dir`` to the one at ``work_dir`` (copy, add, then
    replace both files).

    ``untuned_ms`` (task key -> untuned time, ms) keeps only records faster than the task's untuned
    code: with a small budget, or on a busy machine, every sampled schedule of a cheap task can be
    slower than TVM's default lowering (an example: docs/decisions.md, "Tuned records slower than
    the untuned code are not kept"), and the database would apply the best of them anyway.

    Returns:
        (records measured, keys of the tasks that got at least one record kept).
    """
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    staging = f"{work_dir}.merge-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        for name in (WORKLOADS, RECORDS):
            if os.path.exists(os.path.join(work_dir, name)):
                shutil.copy(os.path.join(work_dir, name), os.path.join(staging, name))
        dst = ms.database.JSONDatabase(work_dir=staging)
        records = ms.database.JSONDatabase(work_dir=src_dir).get_all_tuning_records()
        kept = set()
        for r in records:
            key = str(tvm_ffi.structural_hash(r.workload.mod))
            secs = [float(t) for t in (r.run_secs or [])]
            limit = (untuned_ms or {}).get(key, math.nan)
            failed = not secs or max(secs) >= FAILED_RUN_SECS
            if failed or (math.isfinite(limit) and 1000.0 * sum(secs) / len(secs) >= limit):
                continue
            wl = dst.commit_workload(r.workload.mod)
            dst.commit_tuning_record(ms.database.TuningRecord(r.trace, wl, r.run_secs, r.target, r.args_info))
            kept.add(key)
        os.makedirs(work_dir, exist_ok=True)
        os.replace(os.path.join(staging, WORKLOADS), os.path.join(work_dir, WORKLOADS))
        os.replace(os.path.join(staging, RECORDS), os.path.join(work_dir, RECORDS))
        return len(records), kept
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _buckets(plan: dict) -> list[tuple[int, list[str]]]:
    """Group task keys by trial count rounded to a power of two (one MetaSchedule run per group,
    largest first)."""
    groups: dict[int, list[str]] = {}
    for key, n in plan.items():
        if n > 0:
            groups.setdefault(2 ** round(math.log2(n)), []).append(key)
    return sorted(groups.items(), reverse=True)


def _runner_and_export(target, device):
    """MetaSchedule runner and builder export for measuring on ``device`` (None: this machine):
    an ``RPCRunner`` with one worker per device registered under the key (they measure in parallel)
    and shared libraries the servers load as they are (cross-compiled for ``arm``)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner import PyRunner

    from .fastbuild import export_shared, export_shared_aarch64
    from .remote import alloc_argument_in_bounds, create_session_fail_fast
    from .targets import target_family

    if device is None or not device.is_remote:
        return ms.runner.LocalRunner(timeout_sec=30), None
    rpc = ms.runner.RPCRunner(rpc_config=device.rpc_config(), max_workers=max(1, device.count()),
                              f_create_session=create_session_fail_fast, f_alloc_argument=alloc_argument_in_bounds)

    @derived_object
    class DeviceRunner(PyRunner):
        """The RPC runner, stopping the tuning (BackendError) once the device is no longer registered."""

        def __init__(self):
            super().__init__()
            self.inner = rpc

        def run(self, runner_inputs):
            device.registered()
            return self.inner.run(runner_inputs)

    return DeviceRunner(), export_shared_aarch64 if target_family(target) == "arm" else export_shared


@contextlib.contextmanager
def _unnamed_handlers_detached():
    """Detach the handlers without a name from MetaSchedule's logger while it tunes.

    Each tuning call rebuilds that logger with ``logging.config.dictConfig``, listing the logger's current
    handlers by name; one without a name (pytest >= 9 attaches its capture handler to every logger that does
    not propagate, and TVM's own logger does not) makes it fail with "'NoneType' object has no attribute
    'format'". They are attached again afterwards."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    foreign = [h for h in logger.handlers if h.get_name() is None]
    for h in foreign:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in foreign:
            logger.addHandler(h)


def _run_metaschedule(tasks: list, plan: dict, tmp: str, target=None, device=None) -> None:
    """Tune ``tasks`` (ExtractedTask) with ``plan[key]`` trials each into the database at ``tmp``,
    measuring on ``device`` (None: this machine)."""
    from tvm.s_tir import meta_schedule as ms

    from .fastbuild import pooled_builder, preload_tensor_intrin

    preload_tensor_intrin()
    by_key = {task_key(t): t for t in tasks}
    runner, f_export = _runner_and_export(target, device)
    builder = pooled_builder(max_workers=os.cpu_count() or 1, f_export=f_export)
    database = ms.database.JSONDatabase(work_dir=tmp)
    cost_model = ms.cost_model.XGBModel(adaptive_training=True)
    try:
        with _unnamed_handlers_detached():
            for n, keys in _buckets(plan):
                # evolutionary search is slow to reach its first trial (population sampling and cost-model
                # ranking); for a handful of trials, random samples of the design space (replay-trace) start
                # at once (docs/decisions.md, "Replay-trace search for up to 8 trials per task")
                contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    [by_key[k] for k in keys], work_dir=tmp, strategy="evolutionary" if n > 8 else "replay-trace")
                ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=tmp, max_trials_global=n * len(keys),
                              max_trials_per_task=n, num_trials_per_iter=min(16, n), builder=builder,
                              runner=runner, database=database, cost_model=cost_model)
    finally:
        builder.shutdown()


def _untuned_costs(tasks, target, progress: bool, device) -> list:
    """Untuned time of each task, measured where the tuning measures (this machine or ``device``)."""
    from .remote import open_session
    from .tuning_plan import task_costs

    if device is None or not device.is_remote:
        return task_costs(tasks, target, progress)
    sess = open_session(device, target)
    try:
        return task_costs(tasks, target, progress, session=sess)
    finally:
        del sess  # frees the device for the tuning's own sessions


def _valid_counts(db_dir: str) -> dict:
    """Task key -> number of records with a measured time in the database at ``db_dir``."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    counts: dict = {}
    if not os.path.exists(os.path.join(db_dir, RECORDS)):
        return counts
    for r in ms.database.JSONDatabase(work_dir=db_dir).get_all_tuning_records():
        secs = [float(t) for t in (r.run_secs or [])]
        if secs and max(secs) < FAILED_RUN_SECS:
            key = str(tvm_ffi.structural_hash(r.workload.mod))
            counts[key] = counts.get(key, 0) + 1
    return counts


def _record_tasks(work_dir: str, manifest: dict, costs, plan: dict, scheduled: set, target) -> None:
    """Mark the tasks of ``costs`` as handled in ``tasks.json`` (with their plan and whether a schedule
    was kept) and write ``meta.json``."""
    import tvm

    from .targets import target_json

    for c in costs:
        manifest[c.key] = {"name": c.name, "weight": c.weight, "untuned_ms": round(c.untuned_ms, 4),
                           "trials": plan[c.key], "scheduled": c.key in scheduled}
    _write_json(os.path.join(work_dir, MANIFEST), manifest)
    _write_json(os.path.join(work_dir, META), {"tvm_version": tvm.__version__,
                                               "target": json.loads(target_json(target))})


def _keep_partial(exc, tmp, work_dir, costs, plan, manifest, target, device) -> BackendError:
    """After a remote tuning failed midway: merge the records measured so far into the database,
    mark done only the tasks that got all their planned trials (a rerun tunes the rest), and return
    the error to raise."""
    counts = _valid_counts(tmp)
    measured, scheduled = _merge(tmp, work_dir, {c.key: c.untuned_ms for c in costs})
    done = [c for c in costs if plan[c.key] == 0 or counts.get(c.key, 0) >= plan[c.key]]
    _record_tasks(work_dir, manifest, done, plan, scheduled, target)
    why = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
    return BackendError(f"tuning on {device} stopped ({why}); kept the {measured} trials measured so far in "
                        f"{work_dir} ({len(done)} of {len(costs)} tasks complete); rerun the same command to "
                        f"tune the remaining {len(costs) - len(done)} tasks")


def tune(mod, target, trials_per_task: int = DEFAULT_TRIALS_PER_TASK, cache_dir: Optional[str] = None,
         op_names: Optional[Sequence[str]] = None, progress: bool = True, force: bool = False,
         device=None) -> TuneResult:
    """Tune the tasks of ``mod`` for ``target`` that the target's database does not have yet.

    Tasks already in the database (from this graph or any other tuned for ``target``) are reused. The
    new tasks are measured untuned and get trials by :func:`vitprune.backends.tvm.tuning_plan.plan_trials`:
    a budget of ``trials_per_task × (tasks worth tuning)`` split by the square root of each task's
    untuned time, so the large matmuls get most of it and tasks that cost microseconds get none.

    Args:
        mod: Relax module as imported (before legalization); it is prepared like ``static_shape_tuning``.
        target: a ``tvm.target.Target``: the host CPU (measured here), or the target of ``device``.
        trials_per_task: mean trials per tuned task (>= 1).
        cache_dir: cache root (default :func:`cache_root`).
        op_names: consider only tasks whose name contains one of these (others get no schedule).
        progress: tqdm bars (untuned measurement, trials measured).
        force: re-tune this graph's tasks even when the database has them.
        device: a remote :class:`vitprune.devices.Device` to measure on (MetaSchedule ``RPCRunner``, in
            parallel on every device of its key; untuned times measured there too); None: this machine.
            If the device is lost midway, the records measured so far are merged and the tasks whose
            trials all completed are marked done, so a rerun resumes with the others.

    Returns:
        :class:`TuneResult`; ``work_dir`` is what :func:`apply_database` reads; ``cache_hit`` when no
        task needed tuning; ``num_tasks`` the tasks tuned now; ``trials`` the trials measured now.

    Raises:
        BackendError: a non-host target without a remote device, a bad budget, or a MetaSchedule
            failure (device lost: says what was kept and to rerun).
    """
    import tvm

    from .targets import target_family
    from .tuning_plan import plan_trials

    if not isinstance(trials_per_task, int) or trials_per_task < 1:
        raise BackendError(f"trials_per_task must be a positive integer, got {trials_per_task!r}")
    remote = device is not None and device.is_remote
    if target_family(target) != "cpu" and not remote:
        raise BackendError(f"autotuning measures on this machine, so it needs the host CPU target; got "
                           f"{target_family(target)!r}: tune on the device (--tracker HOST:PORT --device-key K, "
                           f"docs/devices.md), or build untuned")
    if remote and target_family(target) == "cuda":
        raise BackendError("remote tuning supports cpu and arm targets; for cuda build untuned (dlight schedules)")
    t0 = time.time()
    work_dir = database_dir(target, cache_dir)
    gkey = graph_key(mod, op_names)
    with _Lock(work_dir):
        meta = read_meta(work_dir)
        if meta and meta.get("tvm_version") != tvm.__version__:
            warnings.warn(f"tuning cache {work_dir} was made with TVM {meta.get('tvm_version')}, this is TVM "
                          f"{tvm.__version__}; re-tuning", stacklevel=2)
            shutil.rmtree(work_dir, ignore_errors=True)
            meta = {}
        if meta and not force and gkey in _read_json(os.path.join(work_dir, GRAPHS)):
            return TuneResult(work_dir, True, 0, 0, time.time() - t0)
        tasks = graph_tasks(mod, target, op_names)
        manifest = _read_json(os.path.join(work_dir, MANIFEST))
        todo = [t for t in tasks if force or task_key(t) not in manifest]
        if not todo:
            _remember_graph(work_dir, gkey, len(tasks))
            return TuneResult(work_dir, True, 0, 0, time.time() - t0)
        costs = _untuned_costs(todo, target, progress, device)
        plan = plan_trials(costs, trials_per_task)
        root = os.path.dirname(work_dir)
        _remove_stale(root)
        tmp = f"{work_dir}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        stop = threading.Event()
        watcher = threading.Thread(target=_progress_thread,
                                   args=(os.path.join(tmp, RECORDS), sum(plan.values()), stop, progress), daemon=True)
        watcher.start()
        try:
            try:
                _run_metaschedule(todo, plan, tmp, target, device)
            except Exception as exc:
                if not remote:
                    raise
                stop.set()
                watcher.join()
                raise _keep_partial(exc, tmp, work_dir, costs, plan, manifest, target, device) from exc
            stop.set()
            watcher.join()
            trials, scheduled = _merge(tmp, work_dir, {c.key: c.untuned_ms for c in costs})
            _record_tasks(work_dir, manifest, costs, plan, scheduled, target)
            _remember_graph(work_dir, gkey, len(tasks))
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"MetaSchedule tuning failed: {type(exc).__name__}: {str(exc).strip()[:300]}") from exc
        finally:
            stop.set()
            shutil.rmtree(tmp, ignore_errors=True)
    return TuneResult(work_dir, False, sum(1 for v in plan.values() if v), trials, time.time() - t0)


def apply_database(mod, target, work_dir: str):
    """Lower ``mod`` with the schedules of the tuning database at ``work_dir`` (no new trials):
    ``static_shape_tuning`` with ``total_trials=0`` (TVM_NOTES.md §2 "cache-hit path"). Tasks the
    database lacks (left untuned by the plan) get TVM's default lowering.

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
    """The target's tuning database if it has handled every task of ``mod`` (made by this TVM
    version), else None (build untuned)."""
    import tvm

    t0 = time.time()
    work_dir = database_dir(target, cache_dir)
    meta = read_meta(work_dir)
    if meta.get("tvm_version") != tvm.__version__ or not os.path.exists(os.path.join(work_dir, RECORDS)):
        return None
    if graph_key(mod, op_names) not in _read_json(os.path.join(work_dir, GRAPHS)):
        manifest = _read_json(os.path.join(work_dir, MANIFEST))
        if any(task_key(t) not in manifest for t in graph_tasks(mod, target, op_names)):
            return None
    return TuneResult(work_dir, True, 0, 0, time.time() - t0)
