"""``vitprune.compile()``: capture, run the pass pipeline, lower, wrap the result."""

from __future__ import annotations

import inspect
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from torch.fx import GraphModule

from ._version import __version__
from .backends import check_export_path, get_backend
from .errors import ParityError
from .families import check_supported
from .ir.flops import gmacs
from .ir.capture import capture, check_example_inputs, check_image_batch
from .passes.base import Pass, PassContext
from .pipeline import PassLike, resolve_passes, run_passes
from .progress import CompileProgress


@dataclass
class CompileReport:
    """What compile() did: per pass its configuration and what it changed; GMACs before/after.

    GMACs are multiply-accumulates per image / 1e9 (the papers' "GFLOPs").
    """

    model: str
    backend: str
    input_shape: list
    gmacs_before: float
    gmacs_after: float
    passes: list = field(default_factory=list)
    seconds: float = 0.0
    weights: str = "unknown"

    @property
    def gmacs_ratio(self) -> float:
        return self.gmacs_after / self.gmacs_before if self.gmacs_before else float("nan")

    def to_dict(self) -> dict:
        return {
            "model": self.model, "backend": self.backend, "input_shape": self.input_shape,
            "gmacs_before": self.gmacs_before, "gmacs_after": self.gmacs_after,
            "passes": self.passes, "seconds": round(self.seconds, 2), "vitprune_version": __version__,
            "weights": self.weights,
        }

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path:
            with open(path, "w") as f:
                f.write(text)
        return text

    def __str__(self) -> str:
        lines = [f"{self.model} -> {self.backend}: {self.gmacs_before:.3f} -> {self.gmacs_after:.3f} GMACs "
                 f"({100 * (1 - self.gmacs_ratio):.1f}% fewer)"]
        for p in self.passes:
            info = {k: v for k, v in p.items() if k not in ("pass", "config")}
            lines.append(f"  {p['pass']}: {_summary(info)}")
        return "\n".join(lines)


def _summary(info: dict, width: int = 200) -> str:
    """``key=value`` pairs of a pass's report entry, whole pairs only, ending in "…" when cut at ``width``."""
    parts, used = [], 0
    for k, v in info.items():
        text = f"{k}={json.dumps(v, default=str, separators=(',', ':'))}"
        if used + len(text) > width and parts:
            return " ".join(parts) + f" … (+{len(info) - len(parts)} more in report.to_json())"
        parts.append(text if len(text) <= width else text[:width - 1] + "…")
        used += len(text) + 1
    return " ".join(parts)


class CompiledModule:
    """The result of :func:`compile`: callable on ``[B, 3, H, W]`` float32 images -> logits.

    Attributes:
        graph_module: the transformed torch.fx GraphModule (the IR after all passes).
        report: the :class:`CompileReport`.
        lowered: the backend module that runs.
    """

    def __init__(self, graph_module: GraphModule, lowered, report: CompileReport, passes: Sequence[Pass],
                 example_inputs: tuple):
        self.graph_module = graph_module
        self.lowered = lowered
        self.report = report
        self.passes = list(passes)
        self.example_inputs = example_inputs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, classes]`` of images ``[B, C, H, W]`` at the compiled image size (BackendError otherwise)."""
        check_image_batch(x, self.example_inputs[0].shape[1:], "this compiled model")
        return self.lowered(x)

    def manifest(self) -> dict:
        """What an exported artefact records: how it was made, so it can be rebuilt."""
        return {
            "format": "vitprune", "vitprune_version": __version__, "model": self.report.model,
            "backend": self.report.backend, "input_shape": self.report.input_shape,
            "passes": [p.config() for p in self.passes],
            "gmacs_before": self.report.gmacs_before, "gmacs_after": self.report.gmacs_after,
        }

    def export(self, path: str) -> str:
        """Write the compiled model to ``path``, atomically: ``.pt2`` (torch.export archive) for the torch
        backend, ``.onnx`` for onnx, ``.so`` (+ ``.so.json``) for tvm. ``vitprune.load(path)`` reads it.

        Raises:
            BackendError: the suffix is not the backend's (:data:`vitprune.backends.EXPORT_SUFFIX`).
            DataError: the folder is missing or read-only, or ``path`` names a folder.
        """
        check_export_path(self.report.backend, path)
        return self.lowered.export(path, self.manifest())


def _transform(model: nn.Module):
    """The model's eval transform for passes that load images (None when timm cannot resolve one)."""
    from .data import eval_transform

    try:
        return eval_transform(model)
    except Exception:  # not a timm-style model: the passes fall back to the input-size rule
        return None


def default_example_inputs(model: nn.Module) -> tuple:
    """A zero image batch ``[1, 3, H, W]`` at the model's configured input size (timm's
    ``pretrained_cfg['input_size']``, else 224 x 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    return (torch.zeros(1, c, h, w),)


def compile(model: nn.Module, passes: Union[PassLike, Sequence[PassLike]] = (), backend: str = "torch",
            example_inputs: Any = None, calibration: Optional[torch.Tensor] = None, progress: bool = True,
            check_parity: Union[bool, str] = True, atol: float = 1e-4, **backend_options: Any) -> CompiledModule:
    """Compile a pre-trained ViT: capture, run ``passes`` in order, lower to ``backend``.

    Args:
        model: a timm, torchvision or Hugging Face ViT classifier. Never mutated.
        passes: Pass instances, spec strings (``"zero-tprune:target_gmacs=0.96"``), config dicts,
            names of :data:`vitprune.pipeline.PIPELINES` or JSON config paths
            (:func:`vitprune.pipeline.resolve_passes`); run in order by
            :func:`vitprune.pipeline.run_passes`.
        backend: ``"torch"`` (more with the ONNX and TVM backends installed).
        example_inputs: ``[B, 3, H, W]`` float tensor; default zeros at the model's input size.
        calibration: calibration images ``[N, 3, H, W]`` for passes that need data.
        progress: one progress display on stderr for the whole compile (:mod:`vitprune.progress`:
            capture, each pass with its current step and per-block detail, lowering; elapsed and
            estimated time left), cleared when compile returns or raises; backends that take a
            ``progress`` option (tvm's tuning bars) get the same value. False: no output.
        check_parity: compare the lowered module with the eager graph on ``example_inputs``;
            True raises :class:`ParityError`, ``"warn"`` warns, False skips.
        atol: parity tolerance on logits (max abs difference).
        **backend_options: passed to the backend's ``lower`` (``mode="compile"``, ``target=``...).

    Returns:
        a :class:`CompiledModule`.

    Raises:
        UnsupportedModelError, InvalidPassConfigError, BackendError, ParityError.
    """
    t0 = time.time()
    pass_list = resolve_passes(passes)  # validate every config before touching a graph
    check_supported(type(model).__name__, [p.name for p in pass_list])
    example = check_example_inputs(example_inputs) if example_inputs is not None else default_example_inputs(model)
    lower = get_backend(backend).lower
    if "progress" in inspect.signature(lower).parameters:     # tvm's tuning bars follow ``progress``
        backend_options["progress"] = progress
    with CompileProgress(len(pass_list) + 2, enabled=progress) as display:   # cleared on return or raise
        display.begin("capture")
        gm = capture(model, example)
        image_shape = tuple(example[0].shape[1:])
        before = gmacs(gm, image_shape)
        ctx = PassContext(example_inputs=example, calibration=calibration, display=display,
                          transform=_transform(model))
        gm, entries = run_passes(gm, pass_list, ctx)
        after = gmacs(gm, image_shape) if pass_list else before
        display.begin(f"lower {backend}")
        lowered = lower(gm, example, **backend_options)
        if check_parity:
            display.step("parity check")
            _check_parity(gm, lowered, example, atol, warn_only=check_parity == "warn", backend=backend)
    report = CompileReport(model=gm.meta.get("vitprune_model_class", type(model).__name__), backend=backend,
                           input_shape=list(example[0].shape), gmacs_before=before, gmacs_after=after,
                           passes=entries, seconds=time.time() - t0,
                           weights=str(getattr(model, "vitprune_weights", "unknown")))
    return CompiledModule(gm, lowered, report, pass_list, example)


def _check_parity(gm: GraphModule, lowered, example: tuple, atol: float, warn_only: bool, backend: str) -> None:
    with torch.no_grad():
        ref = gm(*example)
        out = lowered(*example)
    diff = (out.float() - ref.float()).abs().max().item()
    if diff > atol:
        msg = (f"backend {backend!r}: lowered module differs from eager PyTorch by {diff:.2e} (max abs logit "
               f"difference) > atol {atol:.0e}; pass check_parity='warn' to continue anyway")
        if warn_only:
            warnings.warn(msg, stacklevel=3)
        else:
            raise ParityError(msg)
