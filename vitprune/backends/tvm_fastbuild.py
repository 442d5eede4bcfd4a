"""MetaSchedule builder function for this package's tuning workers (TVM_NOTES.md "Packaging blockers" 3).

Kept in its own tiny module: pool workers import it by reference, so it must not pull in torch or
the rest of vitprune. It is the stock ``default_build`` minus ``import tvm.s_tir.tensor_intrin``,
an import that takes ~24 s per worker and makes every stock ``LocalBuilder`` build time out on a
small machine. fp32 CPU and ARM schedules use no tensor intrinsics, so nothing is lost there.
"""


def fast_build(mod, target, _params):
    """Build one candidate schedule ``mod`` for ``target`` (MetaSchedule ``f_build`` signature)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)
