"""The Apache TVM backend: Relax import and build (:mod:`.backend`), targets (:mod:`.targets`),
MetaSchedule autotuning with a per-target database (:mod:`.tuning`, :mod:`.tuning_plan`,
:mod:`.fastbuild`) and the cache of built libraries (:mod:`.libcache`)."""

from .backend import LoadedTvm, TvmBackend

__all__ = ["LoadedTvm", "TvmBackend"]
