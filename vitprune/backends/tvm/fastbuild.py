"""MetaSchedule builder for this package's tuning (TVM_NOTES.md "Packaging blockers" 3).

Two costs of the stock ``LocalBuilder`` dominate tuning on a small machine, and both are removed here:

- its ``default_build`` does ``import tvm.s_tir.tensor_intrin`` (~24 s per worker): :func:`fast_build`
  is the same build without that import (fp32 CPU and ARM schedules use no tensor intrinsics);
- it starts a fresh process pool for every batch of candidates (to dodge a slow memory leak in
  long-lived workers), so every search iteration pays worker start-up (5-10 s here, more than the
  builds themselves): :class:`PooledBuilder` keeps one pool and recycles each worker after
  ``uses`` builds instead, which bounds the leak the same way.

A third cost is paid once per process: MetaSchedule's ``TuneContext`` imports
``tvm.s_tir.tensor_intrin``, whose ~200 TVMScript intrinsics each call ``inspect.stack()``, which looks
up every frame's module by scanning ``sys.modules`` (thousands of modules once torch is loaded):
170 s on the loaded 2-core machine, far more inside pytest. :func:`preload_tensor_intrin` imports it
with a stack walk that only reads the frames and their source lines (13 s there).

Kept small: pool workers import :func:`fast_build` by reference.
"""


def preload_tensor_intrin() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (the same intrinsics get registered) with a cheap
    ``inspect.stack``: TVMScript's ``prim_func`` uses the outer frames' locals and the code line of
    one of them, which are the same; skipped ``getmodule`` scans are the whole difference."""
    import importlib
    import inspect
    import linecache
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return

    def frames_only(context=1):
        out, frame = [], sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            line = linecache.getline(code.co_filename, frame.f_lineno)
            out.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                         [line] if line else None, 0 if line else None))
            frame = frame.f_back
        return out

    real = inspect.stack
    inspect.stack = frames_only
    try:
        importlib.import_module("tvm.s_tir.tensor_intrin")
    finally:
        inspect.stack = real


def fast_build(mod, target, _params):
    """Build one candidate schedule ``mod`` for ``target`` (MetaSchedule ``f_build`` signature)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def export_shared(mod) -> str:
    """Export a built candidate as a shared library with the host compiler (MetaSchedule ``f_export``
    signature): what an RPC server loads without a compiler of its own."""
    import os
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path)
    return path


def export_shared_aarch64(mod) -> str:
    """:func:`export_shared` with the AArch64 cross compiler (for ``arm`` devices)."""
    import os
    import tempfile

    from .targets import export_kwargs

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, **export_kwargs("arm"))
    return path


def pooled_builder(max_workers: int, timeout_sec: float = 60.0, uses: int = 64, f_export=None):
    """A MetaSchedule builder that builds with :func:`fast_build` in a persistent process pool.

    Args:
        max_workers: parallel build processes.
        timeout_sec: per-candidate build timeout (s); a timed-out build is reported as an error.
        uses: builds per worker before it is replaced (bounds the workers' memory growth).
        f_export: how a built candidate is written for the runner (default: MetaSchedule's tar, which
            the local runner links here; :func:`export_shared` / :func:`export_shared_aarch64` for RPC).

    Returns:
        a ``tvm.s_tir.meta_schedule.builder.PyBuilder`` instance; call ``.shutdown()`` when done.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder import local_builder as lb
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PooledBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec,
                                          maximum_process_uses=uses)

        def build(self, build_inputs):
            jobs = [(fast_build, f_export, b.mod, b.target, lb._serialize_params(b.params)) for b in build_inputs]
            results = []
            for res in self.pool.map_with_error_catching(lambda job: lb._worker_func(*job), jobs):
                if res.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(res.value, None))
                elif res.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"PooledBuilder: timeout after {timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, f"PooledBuilder: build failed\n{res.value}"))
            return results

        def shutdown(self):
            self.pool.shutdown()

    return PooledBuilder()
