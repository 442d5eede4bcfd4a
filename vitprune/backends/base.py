"""The backend protocol: lower a GraphModule to something callable, and export it.

Backends know nothing about pruning: they lower whatever graph they are given (DESIGN.md).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.fx import GraphModule


class LoweredModule(Protocol):
    """A runnable lowered model: ``[B, 3, H, W]`` float32 tensor -> logits ``[B, classes]``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def export(self, path: str, manifest: dict) -> str:
        """Write a self-contained artefact to ``path`` (plus the manifest); return the path."""
        ...


class Backend(Protocol):
    """Lowers a GraphModule for a target."""

    name: str

    def lower(self, gm: GraphModule, example_inputs: tuple, **options: Any) -> LoweredModule: ...
