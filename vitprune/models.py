"""Models by name (timm) with weights from safetensors files, and their eval transforms."""

from __future__ import annotations

import os
from typing import Callable, Optional

import timm
import torch
from torch import nn

from .errors import DataError, UnsupportedModelError


def load_model(name: str, weights: Optional[str] = None) -> nn.Module:
    """Create timm model ``name`` in eval mode, with weights from a safetensors state dict.

    No weights means random initialisation (fine for speed, FLOPs and shape work; no model
    hub is used). Pickle checkpoints are never loaded.

    Raises:
        UnsupportedModelError: ``name`` is not a timm model (close names are suggested).
        DataError: the weights file is missing, not safetensors, or does not match the model
            (the first mismatched keys are listed).
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise UnsupportedModelError(f"unknown timm model name {name!r}{hint}")
    model = timm.create_model(name, pretrained=False)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def load_weights(model: nn.Module, path: str) -> None:
    """Load a safetensors state dict into ``model`` strictly.

    Raises:
        DataError: missing file, not a ``.safetensors`` file, unreadable, or mismatched keys/shapes.
    """
    import safetensors.torch

    if not os.path.isfile(path):
        raise DataError(f"weights file {path} does not exist")
    if not path.endswith(".safetensors"):
        raise DataError(f"weights file {path} is not a .safetensors file; vitprune never loads pickle checkpoints "
                        "(convert with safetensors.torch.save_file(model.state_dict(), 'w.safetensors'))")
    try:
        state = safetensors.torch.load_file(path)
    except Exception as exc:
        raise DataError(f"cannot read {path} as safetensors: {exc}") from exc
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise DataError(f"weights {path} do not match {type(model).__name__}: " + "; ".join(parts)
                        + " (is --model the architecture these weights were saved from?)")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


#: Evaluation crop ratios of the original papers' code where timm's hub config differs.
#: DeiT's official evaluation resizes to int(224 / 0.875) = 256 and center-crops 224
#: (facebookresearch/deit, ``--eval-crop-ratio 0.875``); timm's hub config says 0.9.
EVAL_CROP_PCT = {"deit_": 0.875}


def eval_transform(model: nn.Module, crop_pct: Optional[float] = None) -> Callable:
    """timm's evaluation transform for ``model`` (resize, center crop, normalise): PIL -> [3, H, W].

    Args:
        crop_pct: center-crop ratio; default: the original paper's ratio where known
            (:data:`EVAL_CROP_PCT`, DeiT 0.875), else timm's config for the model.
    """
    cfg = timm.data.resolve_data_config({}, model=model)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    if crop_pct is None:
        crop_pct = next((v for k, v in EVAL_CROP_PCT.items() if arch.startswith(k)), None)
    if crop_pct is not None:
        cfg["crop_pct"] = crop_pct
    return timm.data.create_transform(**cfg)
