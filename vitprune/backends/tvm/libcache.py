"""Built TVM libraries of tuned graphs, cached next to the target's tuning database.

A tuned build applies the database's schedules and generates code for every task of the graph
(DeiT-T with Zero-TPrune: ~18 s), after torch.export + Relax import (~12 s). Neither depends on
anything but the graph, its weights, the target and the database, so the built library is stored
as ``<database>/libs/<key>.so`` and a later compile of the same graph loads it in well under a
second, without exporting or importing anything.

The key (:func:`library_key`) is a SHA-256 over everything the library depends on:

* the graph: the generated Python code of the ``GraphModule`` and of every nested one (ops, their
  order and arguments, shapes baked into views), and the bytes, shape and dtype of every parameter,
  buffer and tensor constant;
* the input shape and dtype (the library is built for one static shape);
* the target JSON, the TVM version, fast-math, the tuned-op filter;
* the database state: a SHA-256 of its tuning records' bytes (about 0.7 ms per MB here), so a
  library built before more schedules were merged is rebuilt rather than reused, while a database
  copied elsewhere (new modification times, same records) still finds its libraries.

Only builds that used a database covering the whole graph are stored (an untuned build is quick
to redo and would otherwise shadow a later tune). ``compile()``'s parity check runs on a loaded
library exactly as on a fresh build. At most :data:`MAX_LIBRARIES` libraries are kept per target
(least recently used go first). Writes are atomic (temporary name, then rename).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Optional, Sequence

import torch
from torch.fx import GraphModule

from ...files import atomic_write, remove_stale_temporaries
from .tuning import RECORDS

MAX_LIBRARIES = 8
LIBS = "libs"


def graph_fingerprint(gm: GraphModule, example_inputs: tuple) -> str:
    """SHA-256 (hex) of ``gm``'s code, every tensor it holds and the example input's shape and dtype.

    Args:
        gm: the (pruned) graph as the backend receives it.
        example_inputs: ``([B, 3, H, W],)``: the static shape the library is built for.
    """
    h = hashlib.sha256()
    for name, mod in sorted(gm.named_modules(), key=lambda kv: kv[0]):
        if isinstance(mod, GraphModule):
            h.update(f"module {name}\n{mod.code}\n".encode())
    tensors = dict(gm.state_dict(keep_vars=True))
    for prefix, mod in gm.named_modules():
        if isinstance(mod, GraphModule):
            for node in mod.graph.nodes:
                if node.op == "get_attr":
                    obj = _get_attr(mod, node.target)
                    if isinstance(obj, torch.Tensor):  # constants that are not parameters or buffers
                        tensors.setdefault(f"{prefix}.{node.target}" if prefix else node.target, obj)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"tensor {name} {tuple(t.shape)} {t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for x in example_inputs:
        h.update(f"input {tuple(x.shape)} {x.dtype}\n".encode())
    return h.hexdigest()


def _get_attr(mod: torch.nn.Module, target: str):
    obj = mod
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def library_key(fingerprint: str, target, work_dir: str, fast_math: bool,
                tune_ops: Optional[Sequence[str]] = None) -> Optional[str]:
    """Key of the library for this graph, target and database state; None if the database has no records.

    Args:
        fingerprint: :func:`graph_fingerprint` of the graph.
        target: the ``tvm.target.Target``.
        work_dir: the target's tuning database (:func:`vitprune.backends.tvm.tuning.database_dir`).
        fast_math: whether fast-math rewrites were applied before the build.
        tune_ops: the tuned-op filter the database lookup used.
    """
    import tvm

    from .targets import target_json

    records = hashlib.sha256()
    try:
        with open(os.path.join(work_dir, RECORDS), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                records.update(chunk)
    except OSError:
        return None
    parts = [fingerprint, target_json(target), tvm.__version__, f"fast_math={bool(fast_math)}",
             ",".join(sorted(tune_ops or [])), f"records={records.hexdigest()}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def library_path(work_dir: str, key: str) -> str:
    """``<work_dir>/libs/<key>.so``."""
    return os.path.join(work_dir, LIBS, f"{key}.so")


def find(work_dir: str, key: Optional[str]) -> Optional[str]:
    """The cached library for ``key`` (its access time refreshed for the LRU), or None."""
    if key is None:
        return None
    path = library_path(work_dir, key)
    if not os.path.isfile(path):
        return None
    os.utime(path)
    return path


def store(executable, work_dir: str, key: Optional[str], **export_options) -> Optional[str]:
    """Export ``executable`` (a CPU or ARM ``relax.VMExecutable``; ``export_options`` go to
    ``export_library``, e.g. the cross compiler) as the library for ``key``; evict the
    least recently used beyond :data:`MAX_LIBRARIES`. Returns the path, or None when ``key`` is None
    or the export fails (the cache is an optimisation: a failure leaves it as it was)."""
    if key is None:
        return None
    path = library_path(work_dir, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with atomic_write(path, "library cache entry") as tmp:
            executable.export_library(tmp, **export_options)
    except Exception:
        return None
    _evict(os.path.dirname(path))
    return path


def _evict(folder: str) -> None:
    remove_stale_temporaries(folder)  # temporaries of processes that died while exporting
    libs = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".so") and ".tmp-" not in f]
    libs.sort(key=lambda p: os.stat(p).st_mtime, reverse=True)
    for p in libs[MAX_LIBRARIES:]:
        try:
            os.remove(p)
        except OSError:
            pass


def copy_library(src: str, dst: str) -> None:
    """Copy a cached library to ``dst`` (atomic: temporary name, then rename)."""
    with atomic_write(dst, "library") as tmp:
        shutil.copyfile(src, tmp)
