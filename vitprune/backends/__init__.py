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


def load(path: str):
    """Load an exported artefact (``.pt2``, ``.onnx``, ``.so`` TVM library) as a callable.

    The result maps ``[B, 3, H, W]`` float32 images to logits and needs no model code.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        BackendError: unknown suffix, or a corrupt or foreign file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in LOADERS:
        raise BackendError(f"cannot load {path}: unknown artefact type {suffix!r}; known: {', '.join(sorted(LOADERS))}")
    return LOADERS[suffix](path)


__all__ = ["BACKENDS", "LOADERS", "get_backend", "load"]
