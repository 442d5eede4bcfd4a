"""Values of intermediate graph nodes: the one ``torch.fx.Interpreter`` helper of the package."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch.fx import GraphModule, Node


def node_values(gm: GraphModule, inputs: Union[torch.Tensor, tuple], nodes: Iterable[Node],
                given: Optional[dict] = None) -> dict:
    """Values of ``nodes`` when ``gm`` runs on ``inputs`` (no grad), computing only their ancestors.

    Args:
        gm: a captured graph (its ``meta['val']`` may be stale; only the graph matters).
        inputs: the graph's inputs, e.g. an image batch ``[B, 3, H, W]`` or a tuple of inputs.
        nodes: nodes of ``gm.graph`` (kept-token indices, a block's activations, masks, ...).
        given: ``{node: tensor}`` values to use instead of computing those nodes (e.g. a block's
            input from a previous call), so running one block costs one block.

    Returns:
        ``{node: value}`` for every requested node.
    """
    nodes = list(nodes)
    given = dict(given or {})
    needed: set = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n not in given:
            stack.extend(n.all_input_nodes)
    interp = torch.fx.Interpreter(gm)
    env = interp.env
    interp.args_iter = iter(inputs if isinstance(inputs, (tuple, list)) else (inputs,))
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n not in needed:
                continue
            env[n] = given[n] if n in given else interp.run_node(n)
    return {n: env[n] for n in nodes}
