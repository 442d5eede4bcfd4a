"""CUDA build pipeline: TVM's default CUDA pipeline with a per-function fallback between dlight rules.

TVM's default CUDA pipeline (``relax/backend/cuda/pipeline.py``) schedules every TIR function with
the first dlight rule that matches it, in the order Matmul, GEMV, Reduction, GeneralReduction,
Fallback. A rule that matches but then fails stops the whole build: on Zero-TPrune's token ranking
before 2026-12 (pairwise comparisons summed per token, a fused ``expand_dims ... greater/equal ...
sum`` kernel) dlight's GEMV rule matched and then failed an assertion in
``collect_block_iter_vars_used_in_access_region``, so ``vitprune export --pass zero-tprune:...
--target cuda`` died with ``AssertionError:``. Today's selection (``ops/token_select.py``) no longer
has that kernel; ``tests/backends/test_pass_targets.py`` keeps one to check the fallback.

:func:`cuda_pipeline` is the same pipeline, except that a rule raising on a function is skipped
and the next rule is tried for that function only; what was used instead is recorded in a
:class:`ScheduleLog` (function, failed rule and its error, rule used), which the backend reports.
A function no rule can schedule is a build error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScheduleLog:
    """Which dlight rule scheduled what, for one CUDA build.

    Attributes:
        fallbacks: ``(function, failed rule, error, rule used instead)`` for every function whose
            first matching rule raised.
        unscheduled: functions no rule could schedule.
    """

    fallbacks: list = field(default_factory=list)
    unscheduled: list = field(default_factory=list)

    def summary(self) -> str:
        """One line per function, e.g. ``fused_take_sum: GEMV, Reduction failed (AssertionError), used Fallback``."""
        by_fn: dict = {}
        for fn, failed, err, used in self.fallbacks:
            by_fn.setdefault(fn, ([], set(), used))[0].append(failed)
            by_fn[fn][1].add(err.split(":")[0])
        return "\n".join(f"  {fn}: {', '.join(rules)} failed ({', '.join(sorted(errs))}), used {used}"
                         for fn, (rules, errs, used) in by_fn.items())


def _rules():
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def apply_default_schedule_with_fallback(log: ScheduleLog):
    """A module pass like ``dlight.ApplyDefaultSchedule(<the CUDA rules>)`` that moves on to the next
    rule when a rule raises on a function, recording it in ``log``."""
    from tvm import tirx
    from tvm.ir.transform import module_pass
    from tvm.target import Target

    rules = _rules()

    @module_pass(opt_level=0, name="VitpruneApplyDefaultScheduleWithFallback")
    def _pass(mod, _ctx):
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or int(func.attrs.get("tirx.is_scheduled", 0) if func.attrs else 0):
                continue
            target = (func.attrs.get("target") if func.attrs else None) or Target.current(allow_none=False)
            failed = []
            for rule in rules:
                try:
                    space = rule.apply(func, target, False)
                except Exception as exc:  # noqa: BLE001 - a failing rule hands the function to the next one
                    msg = str(exc).strip().splitlines()
                    failed.append((type(rule).__name__, f"{type(exc).__name__}{': ' + msg[-1][:120] if msg else ''}"))
                    continue
                if space is None:
                    continue
                sch = space[0] if isinstance(space, list) else space
                updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                for name, err in failed:
                    log.fallbacks.append((gv.name_hint, name, err, type(rule).__name__))
                break
            else:
                if failed:
                    log.unscheduled.append((gv.name_hint, failed))
        for gv, func in updated.items():
            mod[gv] = func
        return mod

    return _pass


def cuda_pipeline(target, log: ScheduleLog):
    """TVM's default CUDA Relax pipeline with :func:`apply_default_schedule_with_fallback` in place of
    ``dlight.ApplyDefaultSchedule`` (same passes, same order otherwise)."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cp

    legalize = [p if p.info.name != "ApplyDefaultSchedule" else apply_default_schedule_with_fallback(log)
                for p in cp.legalize_passes(target)]

    @tvm.transform.module_pass(opt_level=0, name="VitpruneCudaPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(cp.library_dispatch_passes(target) + legalize
                                           + cp.dataflow_lower_passes(target) + cp.finalize_passes(target))
            return seq(mod)

    return _pipeline
