"""Models by name (timm) with weights from safetensors files, and their eval transforms."""

from __future__ import annotations

import os
from typing import Optional

import timm
import torch
from torch import nn

from .data import eval_transform  # re-exported: the one transform rule lives in data.py
from .errors import DataError, UnsupportedModelError


def load_model(name: str, weights: Optional[str] = None, pretrained: bool = False) -> nn.Module:
    """Create timm model ``name`` in eval mode, with weights from a safetensors state dict, or timm's
    pretrained weights from the Hugging Face hub (``pretrained=True``).

    Neither means random initialisation (fine for speed, FLOPs and shape work; accuracy is meaningless).
    The result's ``vitprune_weights`` attribute says which: ``"random"``, ``"pretrained"`` or the file.
    Pickle checkpoints are never loaded.

    Raises:
        UnsupportedModelError: ``name`` is not a timm model (close names are suggested).
        DataError: the weights file is missing, not safetensors, or does not match the model (the first
            mismatched keys are listed); both ``weights`` and ``pretrained``; timm has no pretrained
            weights for ``name``, or the hub cannot be reached.
    """
    if not timm.is_model(name):
        close = similar_model_names(name)
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise UnsupportedModelError(f"unknown timm model name {name!r}{hint}")
    if weights is not None and pretrained:
        raise DataError("give either a weights file or pretrained=True (--pretrained), not both")
    if pretrained:
        model = _pretrained(name)
    else:
        model = timm.create_model(name, pretrained=False)
    if weights is not None:
        load_weights(model, weights)
    model.vitprune_weights = "pretrained" if pretrained else (weights or "random")
    return model.eval()


def similar_model_names(name: str, n: int = 8) -> list[str]:
    """timm model names close to a misspelt ``name``: those whose start reads like it first
    (``deit_tinyy`` -> ``deit_tiny_patch16_224``), then by whole-name similarity."""
    import difflib

    def score(m: str) -> tuple:
        return (difflib.SequenceMatcher(None, name, m[:len(name)]).ratio(), difflib.SequenceMatcher(None, name, m).ratio())

    scored = sorted(((score(m), m) for m in timm.list_models()), reverse=True)
    return [m for (head, whole), m in scored[:n] if head >= 0.75 or whole >= 0.6]


HUB_HOST = "huggingface.co"


def _pretrained(name: str) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``; DataError when timm has no weights for ``name`` or the
    hub cannot be reached (found in one DNS lookup, not after huggingface_hub's minute of retries)."""
    import logging
    import socket

    from .errors import error_line

    if not timm.list_pretrained(name) and not timm.list_pretrained(name + ".*"):
        raise DataError(f"timm has no pretrained weights for {name!r}; give a safetensors file with --weights "
                        f"(models with weights: timm.list_pretrained('{name.split('_')[0]}*'))")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline:
        try:
            socket.getaddrinfo(HUB_HOST, 443)
        except OSError as exc:
            raise DataError(f"cannot reach the Hugging Face hub ({HUB_HOST}: {error_line(exc)}) for the pretrained "
                            f"weights of {name!r}: give a local safetensors file with --weights, or set "
                            f"HF_HUB_OFFLINE=1 to use weights already in the local hub cache") from None
    hub_log = logging.getLogger("huggingface_hub")
    level, hub_log.level = hub_log.level, logging.ERROR
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:
        raise DataError(f"cannot load the pretrained weights of {name!r} from the Hugging Face hub "
                        f"({error_line(exc)}); give a local safetensors file with --weights") from None
    finally:
        hub_log.level = level


def load_weights(model: nn.Module, path: str) -> None:
    """Load a safetensors state dict into ``model`` strictly.

    Raises:
        DataError: missing file, not a ``.safetensors`` file, unreadable, NaN/inf values, or mismatched keys/shapes.
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
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DataError(f"weights {path} hold NaN or infinite values in {len(bad)} tensor(s), e.g. {bad[0]!r}: the "
                        f"file is corrupt or came from a diverged training run")
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


__all__ = ["load_model", "load_weights", "similar_model_names", "eval_transform"]
