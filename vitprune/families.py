"""Model families that are not plain ViTs, and which passes each supports.

A plain ViT (timm ``VisionTransformer``, DeiT, torchvision ``VisionTransformer``, Hugging Face ``ViT``) has
global attention over prefix + patch tokens with absolute position embeddings added before the first
block: every pass applies. The families below compute attention differently, and a pass that assumes
the plain form would either fail deep inside a rewrite or return a wrong model, so they are refused up
front (:func:`check_supported`) with the reason.
"""

from __future__ import annotations

from typing import Iterable

from .errors import UnsupportedModelError

_WINDOWS = ("attention runs inside fixed windows of the patch grid (shifted between blocks), so dropping or "
            "merging tokens breaks the window partition")
_RELPOS_TOKENS = ("the relative-position bias is indexed by the full token grid; it would have to follow the "
                  "kept tokens, which this pass does not do")
_RELPOS_HEADS = "each head has its own relative-position bias, which the head surgery does not slice"

_WINDOWED = {"zero-tprune": _WINDOWS, "tome": _WINDOWS, "head-prune": _RELPOS_HEADS}
_RELPOS = {"zero-tprune": _RELPOS_TOKENS, "tome": _RELPOS_TOKENS, "head-prune": _RELPOS_HEADS}

#: model class name -> (family, {pass name: why it is refused}); passes not named are supported: SNP
#: narrows q-k pairs, values and MLP neurons inside every head, which a per-head bias or a window does not
#: constrain (it compiles and runs on test_vit_relpos and a 4-stage Swin), explicit-attention keeps the math.
FAMILIES: dict[str, tuple[str, dict[str, str]]] = {
    "SwinTransformer": ("Swin (windowed attention)", _WINDOWED),
    "SwinTransformerV2": ("Swin V2 (windowed attention)", _WINDOWED),
    "VisionTransformerRelPos": ("relative-position-bias ViT", _RELPOS),
    "Beit": ("BEiT (relative-position bias)", _RELPOS),
}


def check_supported(model_class: str, pass_names: Iterable[str]) -> None:
    """Refuse passes the model's family does not support (:data:`FAMILIES`).

    Raises:
        UnsupportedModelError: names the first refused pass, the family and why.
    """
    family, refused = FAMILIES.get(model_class, ("", {}))
    for name in pass_names:
        if name in refused:
            raise UnsupportedModelError(f"pass {name!r} does not support {model_class} models ({family}): "
                                        f"{refused[name]}")
