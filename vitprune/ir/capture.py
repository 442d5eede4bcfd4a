"""Capture: an ``nn.Module`` plus example inputs becomes an ATen-level torch.fx GraphModule.

We use ``torch.export.export(..., strict=False).module()``: one ATen-level IR for timm,
torchvision and Hugging Face models, with ``nn_module_stack`` metadata that locates blocks,
and the form that the ONNX and TVM importers consume. The batch dimension is exported as
dynamic, so one captured graph serves every batch size; backends that need static shapes
re-export the final graph at the shape they compile for.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.export import Dim

from ..errors import UnsupportedModelError
from .rewrite import drop_trivial_masks

#: Upper bound of the dynamic batch dimension in captured graphs.
MAX_BATCH = 4096


class LogitsOnly(nn.Module):
    """Wraps a model whose forward returns a structured output (Hugging Face ``ModelOutput``,
    a dict or a tuple) so that it returns the logits tensor ``[B, num_classes]`` alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, dict):
            logits = out.get("logits")
        if logits is None and isinstance(out, (tuple, list)):
            logits = out[0]
        return logits


def _batch_of_two(x: torch.Tensor) -> torch.Tensor:
    # torch.export specialises a dimension whose example size is 0 or 1, so trace with 2.
    if x.shape[0] >= 2:
        return x
    return torch.cat([x, x], dim=0)


def check_example_inputs(example_inputs) -> tuple[torch.Tensor]:
    """Normalise ``example_inputs`` to a 1-tuple holding a float image batch ``[B, 3, H, W]``.

    Raises:
        ValueError: not a tensor (or a 1-tuple of one), or not 4-D.
    """
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) != 1:
            raise ValueError(
                f"example_inputs must hold exactly one image tensor [B, 3, H, W], got {len(example_inputs)} items"
            )
        example_inputs = example_inputs[0]
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4:
        got = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs).__name__
        raise ValueError(f"example_inputs must be an image batch tensor [B, 3, H, W], got {got}")
    return (example_inputs,)


def check_image_batch(x, image_shape, where: str = "this model") -> None:
    """Refuse a run-time input that is not ``[B, *image_shape]`` before it reaches torch / onnxruntime / TVM.

    Raises:
        BackendError: says the expected and the given shape, and how to get the size wanted.
    """
    from ..errors import BackendError

    want = tuple(int(d) for d in image_shape)
    got = tuple(x.shape) if isinstance(x, torch.Tensor) else None
    if got is None or len(got) != 1 + len(want) or got[1:] != want:
        given = f"input of shape {list(got)}" if got is not None else f"a {type(x).__name__}"
        raise BackendError(f"{where} takes images [B, {', '.join(map(str, want))}], got {given}: resize / crop with "
                           f"the model's eval transform (vitprune.models.eval_transform), or compile again with "
                           f"example_inputs of the size you need (timm ViTs take img_size= at creation)")


def export_program(module: nn.Module, example_inputs, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` a module (eval mode, no grad) with an optionally dynamic batch dimension.

    Args:
        module: the model or a GraphModule produced by a pass.
        example_inputs: ``[B, 3, H, W]`` tensor or a 1-tuple of one.
        dynamic_batch: export dim 0 as a symbolic size in ``[1, MAX_BATCH]``.

    Returns:
        The ExportedProgram; ``.module()`` gives the GraphModule.
    """
    (x,) = check_example_inputs(example_inputs)
    if dynamic_batch:
        x = _batch_of_two(x)
        dynamic_shapes = ({0: Dim("batch", min=1, max=MAX_BATCH)},)
    else:
        dynamic_shapes = None
    with torch.no_grad():
        return torch.export.export(module, (x,), strict=False, dynamic_shapes=dynamic_shapes)


def recapture(gm: torch.fx.GraphModule, example_inputs) -> torch.fx.GraphModule:
    """Re-export a (rewritten) GraphModule so that every node has fresh ``val`` metadata.

    ``nn_module_stack`` is preserved from the nodes of ``gm``, so block locations survive.
    Passes call this after editing the graph; it also proves the result still exports.
    """
    gm.graph.lint()
    gm.recompile()
    return export_program(gm, example_inputs).module()


def capture(model: nn.Module, example_inputs) -> torch.fx.GraphModule:
    """Capture ``model`` into an ATen-level ``torch.fx.GraphModule`` with a dynamic batch dim.

    The user's model is never mutated: a deep copy is put in eval mode and exported.
    Structured outputs (Hugging Face ``ModelOutput``) are reduced to their logits.

    Args:
        model: a ViT classifier (timm, torchvision or Hugging Face).
        example_inputs: ``[B, 3, H, W]`` float tensor (or a 1-tuple of one).

    Returns:
        GraphModule mapping ``[B, 3, H, W]`` to logits ``[B, num_classes]``.

    Raises:
        UnsupportedModelError: ``model`` is not an ``nn.Module`` or cannot be exported; the
            message names the model class and the reason.
        ValueError: ``example_inputs`` is not an image batch.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"vitprune captures torch.nn.Module models, got {type(model).__name__}; "
            "pass a timm, torchvision or Hugging Face ViT instance"
        )
    example = check_example_inputs(example_inputs)
    name = type(model).__name__
    module = copy.deepcopy(model).eval()
    module = LogitsOnly(module) if _is_hugging_face(module) else module
    try:
        ep = export_program(module, example)
    except Exception as exc:  # torch.export raises many types; report them uniformly
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"cannot capture {name} with torch.export: {type(exc).__name__}: {first_line[:300]}"
        ) from exc
    gm = ep.module()
    if drop_trivial_masks(gm, example):
        gm = recapture(gm, example)
    gm.meta["vitprune_model_class"] = name
    return gm


def _is_hugging_face(module: nn.Module) -> bool:
    # Hugging Face models subclass transformers.PreTrainedModel and return a ModelOutput.
    return any(base.__module__.startswith("transformers") for base in type(module).__mro__)
