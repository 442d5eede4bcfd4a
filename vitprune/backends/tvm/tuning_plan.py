"""Which tuning tasks get MetaSchedule trials, and how many (the tuning budget plan).

A token-pruned ViT has hundreds of distinct TIR tasks (every kept-token count makes new matmul,
softmax and layer-norm workloads, plus the small selection ops), but the time goes to a few dozen
matmul/conv tasks (the counts for DeiT-T: docs/decisions.md, "Tune only tasks worth it").
MetaSchedule pays one search iteration (seconds) per task however small, so spending the budget
evenly per task ("``trials × tasks``") wastes most of it.

The plan measures every task once as compiled without a schedule (the code a task gets when it is
not tuned: LLVM's default lowering of the naive loop nest), on random inputs, and then

- tunes only tasks whose untuned time per model call (``weight × time``) is at least ``min_ms``;
  the others keep the untuned code, which for such tasks costs microseconds;
- splits the budget ``trials × (tasks tuned)`` over the tuned tasks in proportion to the square root of
  their untuned time (large matmuls get most trials, but every tuned task gets at least
  ``min_trials``), capped at ``max_trials`` per task, where MetaSchedule's gain flattens
  (docs/decisions.md, "32 trials per tuned task on average"; TVM_NOTES.md §2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_MS = 0.05
MIN_TRIALS = 4
MAX_TRIALS = 64


@dataclass
class TaskCost:
    """One tuning task: its name, structural-hash key, occurrences per model call (``weight``),
    FLOPs per call of one occurrence, and the untuned time per occurrence (ms; NaN if not measurable)."""

    name: str
    key: str
    weight: int
    flops: float
    untuned_ms: float

    @property
    def total_ms(self) -> float:
        """Untuned time per model call (ms): ``weight × untuned_ms``; +inf when not measured, so the
        task is tuned rather than left to chance."""
        return self.weight * self.untuned_ms if math.isfinite(self.untuned_ms) else math.inf


def measure_untuned(func, target, repeats: int = 3, session=None) -> float:
    """Untuned time of one task's PrimFunc module ``func`` on ``target`` (ms per call; NaN on failure),
    on this machine or, with an RPC ``session``, on that device (:mod:`vitprune.backends.tvm.remote`).

    Inputs are random floats and zero integers (index arguments must stay in bounds: gather/take
    segfault on out-of-range indices in TVM's fast mode).
    """
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    try:
        ex = tvm.compile(func, target=target)
        if session is None:
            rt, dev = ex.jit(), tvm.cpu()
        else:
            from .remote import upload_library
            from .targets import target_family

            rt, dev = upload_library(session, ex, family=target_family(target)), session.cpu(0)
        prim = func["main"] if isinstance(func, tvm.IRModule) else func
        args = []
        for info in ms.arg_info.ArgInfo.from_prim_func(prim):
            shape, dtype = [int(s) for s in info.shape], str(info.dtype)
            arr = (np.random.rand(*shape).astype(dtype) if dtype.startswith("float")
                   else np.zeros(shape, dtype=dtype))
            args.append(tvm.runtime.tensor(arr, dev))
        return 1000.0 * rt.time_evaluator("main", dev, number=repeats, repeat=1)(*args).mean
    except Exception:  # noqa: BLE001 - an unmeasurable task is simply tuned (total_ms = inf)
        return float("nan")


def task_costs(tasks, target, progress: bool = False, session=None) -> list[TaskCost]:
    """:class:`TaskCost` of each MetaSchedule ``ExtractedTask`` (untuned time measured here, or on
    the device of an RPC ``session``)."""
    import tvm
    import tvm_ffi
    from tqdm import tqdm

    out = []
    for t in tqdm(tasks, desc="measuring untuned tasks", unit="task", disable=not progress):
        func = t.dispatched[0]
        out.append(TaskCost(t.task_name, str(tvm_ffi.structural_hash(func)), int(t.weight),
                            float(tvm.s_tir.analysis.estimate_tir_flops(func)),
                            measure_untuned(func, target, session=session)))
    return out


def plan_trials(costs: list[TaskCost], trials: int, min_ms: float = MIN_MS, min_trials: int = MIN_TRIALS,
                max_trials: int = MAX_TRIALS) -> dict[str, int]:
    """Trials per task key: 0 for tasks left untuned, else ``√share``-proportional (see module doc).

    Args:
        costs: from :func:`task_costs`.
        trials: mean trials per tuned task (the budget is ``trials × tuned tasks``), >= 1.
        min_ms: untuned time per model call (ms) below which a task is not tuned.
        min_trials, max_trials: bounds per tuned task (``min_trials`` is lowered to ``trials`` if larger).

    Returns:
        ``{key: trials}`` for every task of ``costs``.
    """
    tuned = [c for c in costs if c.total_ms >= min_ms]
    plan = {c.key: 0 for c in costs}
    if not tuned:
        return plan
    lo, hi = min(min_trials, trials), max(max_trials, trials)
    finite = [c.total_ms for c in tuned if math.isfinite(c.total_ms)]
    cap = max(finite) if finite else 1.0
    roots = {c.key: math.sqrt(min(c.total_ms, cap)) for c in tuned}
    budget, norm = trials * len(tuned), sum(roots.values())
    for c in tuned:
        plan[c.key] = int(min(hi, max(lo, round(budget * roots[c.key] / norm))))
    return plan
