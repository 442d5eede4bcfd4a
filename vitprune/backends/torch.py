"""PyTorch backend: run the GraphModule eagerly or through ``torch.compile``; export ``.pt2``."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch.fx import GraphModule

from ..errors import BackendError
from ..ir.capture import export_program

MANIFEST_KEY = "vitprune_manifest.json"


class TorchModule:
    """A GraphModule run eagerly (``mode="eager"``) or compiled (``mode="compile"``).

    Call with ``[B, 3, H, W]`` float32 images; returns logits ``[B, num_classes]``.
    """

    def __init__(self, gm: GraphModule, example_inputs: tuple, mode: str = "eager"):
        if mode not in ("eager", "compile"):
            raise BackendError(f"torch backend: mode must be 'eager' or 'compile', got {mode!r}")
        self.gm = gm
        self.example_inputs = example_inputs
        self.mode = mode
        self._fn = torch.compile(gm, dynamic=False) if mode == "compile" else gm

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def export(self, path: str, manifest: dict) -> str:
        """Write a torch.export archive (``.pt2``) with the manifest as an extra file."""
        return save_pt2(self.gm, self.example_inputs, path, manifest)


def save_pt2(gm: GraphModule, example_inputs: tuple, path: str, manifest: dict) -> str:
    """Export ``gm`` (dynamic batch) to a ``.pt2`` archive at ``path``; written atomically."""
    ep = export_program(gm, example_inputs)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        torch.export.save(ep, tmp, extra_files={MANIFEST_KEY: json.dumps(manifest)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class LoadedPt2:
    """A ``.pt2`` archive loaded with no model code: ``[B, 3, H, W]`` -> logits."""

    def __init__(self, path: str):
        extra = {MANIFEST_KEY: ""}
        try:
            ep = torch.export.load(path, extra_files=extra)
        except Exception as exc:
            raise BackendError(f"{path} is not a readable torch.export archive (.pt2): {type(exc).__name__}: {exc}") from exc
        self.manifest = json.loads(extra[MANIFEST_KEY]) if extra[MANIFEST_KEY] else {}
        self.module = ep.module()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class TorchBackend:
    """``backend="torch"``: options ``mode="eager"`` (default) or ``"compile"``."""

    name = "torch"

    def lower(self, gm: GraphModule, example_inputs: tuple, mode: str = "eager", **options: Any) -> TorchModule:
        if options:
            raise BackendError(f"torch backend: unknown option(s) {sorted(options)}; valid: mode")
        return TorchModule(gm, example_inputs, mode=mode)
