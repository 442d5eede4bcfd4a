"""Backends: where a compiled graph runs. ``get_backend(name)`` and ``load(path)``."""

from __future__ import annotations

import os

from ..errors import BackendError
from .onnx import LoadedOnnx, OnnxBackend
from .torch import LoadedPt2, TorchBackend
from .tvm import LoadedTvm, TvmBackend

BACKENDS = {"torch": TorchBackend, "onnx": OnnxBackend, "tvm": TvmBackend}


def get_backend(name: str):
    """The backend called ``name``.

    Raises:
        BackendError: unknown name (lists the available ones).
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]()


LOADERS = {".pt2": LoadedPt2, ".onnx": LoadedOnnx, ".so": LoadedTvm}
#: The artefact suffix each backend's ``export`` writes.
EXPORT_SUFFIX = {"torch": ".pt2", "onnx": ".onnx", "tvm": ".so"}


def check_export_path(backend: str, path: str) -> None:
    """Refuse an export path whose suffix is not the one ``backend`` writes (:data:`EXPORT_SUFFIX`),
    or that cannot be written, before any work.

    Raises:
        BackendError: wrong or missing suffix (says the right name and the backend that writes the given one).
        DataError: the folder is missing or read-only, or ``path`` is a folder.
    """
    from ..files import check_writable

    want = EXPORT_SUFFIX.get(backend)
    root, suffix = os.path.splitext(path)
    if os.path.isdir(path):
        check_writable(path, "artefact")
    if want and suffix.lower() != want:
        other = next((b for b, s in EXPORT_SUFFIX.items() if s == suffix.lower()), None)
        alt = f", or use backend {other!r} to write {suffix}" if other else ""
        got = f"not {suffix!r}" if suffix else "and the path has no suffix"
        raise BackendError(f"backend {backend!r} writes {want} files, {got} ({path}): name it "
                           f"{(root if suffix else path) + want}{alt}")
    check_writable(path, "artefact")


def load(path: str, trust: bool = False):
    """Load an exported artefact (``.pt2``, ``.onnx``, ``.so`` TVM library) as a callable.

    The result maps ``[B, 3, H, W]`` float32 images to logits and needs no model code.

    Args:
        trust: ``.pt2`` and ``.so`` can run code when loaded and are refused unless True; give it only
            for files you made or trust (docs/security.md). ``.onnx`` needs no trust.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UntrustedArtefactError: a ``.pt2``/``.so`` without ``trust=True``, or files that differ from the
            SHA-256 their manifest records.
        BackendError: unknown suffix, or a corrupt or foreign file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in LOADERS:
        raise BackendError(f"cannot load {path}: unknown artefact type {suffix!r}; known: {', '.join(sorted(LOADERS))}")
    return LOADERS[suffix](path, trust=trust)


__all__ = ["BACKENDS", "EXPORT_SUFFIX", "LOADERS", "check_export_path", "get_backend", "load"]
