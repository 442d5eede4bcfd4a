"""Repair the static widths torch.export bakes into reshapes and expands after weight surgery.

An exported graph stores every reshape/expand size as a constant (only the batch is symbolic).
When a pass makes a projection narrower (SNP: q/k/v widths ``H·d -> H'·d'``), the reshapes on
the attention path are rewritten by the pass itself, but readers elsewhere still carry the old
width: e.g. Zero-TPrune's S-stage flattens a block's keys to ``[B, N, H·d]`` and gathers
them with an index expanded to ``[B, K, H·d]``. :func:`repair_widths` runs the graph once on a
small input and, node by node, fixes exactly those two patterns; anything else that fails is
reported, never silently patched.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.fx import GraphModule, Node

from .rewrite import RESHAPE_OPS

aten = torch.ops.aten
EXPAND_OPS = {aten.expand.default}
GATHER_OPS = {aten.gather.default}


def _fixed_reshape(node: Node, env: dict, old_widths: set) -> list | None:
    """New size list for a reshape whose last (static) size is a stale width, else None."""
    shape = list(node.args[1])
    if not isinstance(shape[-1], int) or shape[-1] not in old_widths:
        return None
    inp = env.get(node.args[0])
    others = [int(env[s]) if isinstance(s, Node) else s for s in shape[:-1]]
    prod = math.prod(others)
    if inp is None or prod <= 0 or inp.numel() % prod:
        return None
    shape[-1] = inp.numel() // prod
    return shape


def _fixed_expand(gather: Node, env: dict, old_widths: set) -> Node | None:
    """The expand feeding ``gather``'s index, with its stale last size set to the source's width."""
    idx = gather.args[2]
    if not (isinstance(idx, Node) and idx.target in EXPAND_OPS):
        return None
    sizes = list(idx.args[1])
    src = env.get(gather.args[0])
    if src is None or not isinstance(sizes[-1], int) or sizes[-1] not in old_widths or gather.args[1] in (-1, src.dim() - 1):
        return None
    sizes[-1] = src.shape[-1]
    idx.args = (idx.args[0], sizes) + tuple(idx.args[2:])
    return idx


def repair_widths(gm: GraphModule, x: torch.Tensor, old_widths: Iterable[int]) -> int:
    """Run ``gm`` on ``x`` and fix stale widths in place; returns the number of nodes fixed.

    Fixed patterns (``w`` in ``old_widths`` is a width that a pass changed):

    - ``reshape/view(t, [..., w])`` whose input no longer has that many elements: the last size
      becomes ``numel / prod(other sizes)``;
    - ``gather(src, dim, expand(idx, [..., w]))`` along a non-last dim whose ``src`` is narrower
      now: the expand's last size becomes ``src.shape[-1]``.

    Args:
        gm: graph edited in place (recompiled when something changed).
        x: ``[b, 3, H, W]`` example images (``b`` small; values do not matter).
        old_widths: the widths that were changed.

    Raises:
        RuntimeError: a node fails for another reason (naming the node).
    """
    old = set(int(w) for w in old_widths)
    interp = torch.fx.Interpreter(gm)
    interp.args_iter = iter([x])
    env = interp.env
    fixed = 0
    with torch.no_grad():
        for n in gm.graph.nodes:
            try:
                env[n] = interp.run_node(n)
                continue
            except RuntimeError as exc:
                error = exc
            if n.target in RESHAPE_OPS and (shape := _fixed_reshape(n, env, old)) is not None:
                n.args = (n.args[0], shape) + tuple(n.args[2:])
            elif n.target in GATHER_OPS and (idx := _fixed_expand(n, env, old)) is not None:
                env[idx] = interp.run_node(idx)
            else:
                raise RuntimeError(f"node '{n.name}' ({n.target}) fails after width surgery and is not a "
                                   f"reshape or gather index of a changed width: {error}") from error
            env[n] = interp.run_node(n)
            fixed += 1
    if fixed:
        gm.recompile()
    return fixed
