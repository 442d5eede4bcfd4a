"""In-process memo of calibration statistics that do not depend on the pruning budget.

A sweep calls SNP many times on the same model and calibration images with different budgets;
the Fisher scores of the ORIGINAL model (:func:`vitprune.passes.snp.sensitivity.block_fisher_scores`)
are the same every time. They are memoised under a key of the graph's code, the bytes of its
parameters and buffers, the calibration views and the options that shape them, so a changed
weight, image or option never hits a stale entry. At most :data:`MAX_ENTRIES` are kept (oldest
dropped first); nothing is written to disk.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch.fx import GraphModule

#: statistics kept at once (one entry per model x calibration set x options)
MAX_ENTRIES = 4
_MEMO: "OrderedDict[str, Any]" = OrderedDict()


def fingerprint(gm: GraphModule, images: torch.Tensor, *options: Any) -> str:
    """SHA-256 of ``gm``'s code, every parameter and buffer (names, shapes, dtypes, bytes), the
    calibration ``images`` ``[n, 3, H, W]`` and ``options`` (their ``repr``)."""
    h = hashlib.sha256()
    h.update(gm.code.encode())
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    h.update(f"{tuple(images.shape)}:{images.dtype}".encode())
    h.update(images.detach().contiguous().cpu().numpy().tobytes())
    h.update(repr(options).encode())
    return h.hexdigest()


def memo(key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` the first time ``key`` is seen, the kept value afterwards."""
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    value = compute()
    _MEMO[key] = value
    while len(_MEMO) > MAX_ENTRIES:
        _MEMO.popitem(last=False)
    return value


def clear() -> None:
    """Drop every memoised value."""
    _MEMO.clear()
