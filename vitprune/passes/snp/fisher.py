"""Fisher information of structure masks (Kwon et al. 2022, "A Fast Post-Training Pruning
Framework for Transformers", NeurIPS, §4.1 "Fisher-based mask search").

A mask variable ``m_i`` (initially 1) multiplies the output of structure ``i`` (a q-k pair, a
value neuron, an fc1 neuron, a head). For a calibration image ``b`` with loss ``L_b``, the mask
gradient is ``g_bi = dL_b / dm_i = sum_tokens a_i * dL_b / da_i`` (``a_i``: the masked
activation), and the diagonal empirical Fisher information is ``F_ii = sum_b g_bi^2``. Kwon et
al. approximate the loss increase of removing a set ``Z`` of structures by
``1/2 * sum_{i in Z} F_ii`` (diagonal approximation of their block-diagonal Fisher).

No labels are used: the loss is the cross-entropy against the ORIGINAL model's own top-1
prediction (pseudo-labels). The KL divergence to the original output distribution would be the
natural alternative, but its gradient is exactly zero at the unpruned model, so it carries no
first-order information.

* :func:`mask_gradients`: per-image mask gradients of chosen nodes of a captured graph.
* :func:`fisher_from_gradients`: ``sum_b g_b^2``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch.fx import GraphModule, Node


def fisher_from_gradients(g: torch.Tensor) -> torch.Tensor:
    """Diagonal empirical Fisher ``sum_b g[b]^2``: ``[B, ...] -> [...]`` (float64)."""
    return (g.double() ** 2).sum(0)


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy ``-sum_b log softmax(logits_b)[labels_b]`` (``[B, C]``, ``[B]``)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


def mask_gradients(gm: GraphModule, x: torch.Tensor, masked: Mapping[Node, int],
                   labels: Optional[torch.Tensor] = None, probes: Sequence[Node] = (),
                   values: Optional[dict] = None) -> tuple[dict, torch.Tensor]:
    """Per-image gradients of the pseudo-label loss w.r.t. multiplicative masks of ones.

    Args:
        gm: captured graph (not modified; its parameters get no gradient).
        x: images ``[B, 3, H, W]``.
        masked: ``{node: token_dim}``: the output of ``node`` (shape ``[B, ...]``) is multiplied
            by a mask of ones of the same shape except size 1 on ``token_dim`` (the axis the mask
            is shared over: 2 for per-head ``[B, H, N, d]`` queries, 1 for ``[B, N, C]``
            linear inputs), so each image and each channel has its own mask variable; None: one
            mask ``[C]`` for the whole batch (flattened layouts; gradient returned as ``[1, C]``).
        labels: ``[B]`` class indices; default: the model's own top-1 prediction on ``x``.
        probes: nodes whose output gradient ``dL / d out`` (full shape) is wanted too.
        values: if given, filled with ``{probe: output}`` (the probes' forward values, detached:
            the unpruned graph's activations, which a caller can reuse instead of a second forward).

    Returns:
        ``({node: g [B, ...mask shape without the token axis]}, labels [B])`` with
        ``g[b] = dL_b / dm`` (float32); for probe nodes, ``g = dL / d out``.

    Raises:
        ValueError: a masked node is not in ``gm.graph`` or its output is not a tensor.
    """
    names = {n for n in gm.graph.nodes}
    for n in list(masked) + list(probes):
        if n not in names:
            raise ValueError(f"mask_gradients: node {n} is not in the graph")
    masks: dict = {}
    outs: dict = {}  # probe -> its output tensor in the autograd graph
    probe_set = set(probes)

    class _Masking(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in masked:
                if not isinstance(out, torch.Tensor):
                    raise ValueError(f"mask_gradients: node {n} does not produce a tensor")
                shape = list(out.shape)
                if masked[n] is None:  # no separate batch/token axes: one mask for the whole batch
                    shape = [1] * (len(shape) - 1) + [shape[-1]]
                else:
                    shape[masked[n]] = 1
                m = torch.ones(shape, dtype=out.dtype, requires_grad=True)
                masks[n] = m
                out = out * m
            if n in probe_set:
                if values is not None:
                    values[n] = out.detach()
                if not out.requires_grad:  # nothing upstream wants a gradient: a leaf of the same value
                    out = out.detach().requires_grad_()
                outs[n] = out  # autograd.grad of a non-leaf gives dL / d out over all its uses
            return out

    with torch.enable_grad():
        logits = _Masking(gm).run(x)
        if labels is None:  # masks of ones leave the logits bit-identical to gm(x)
            labels = logits.detach().argmax(-1)
        loss = pseudo_label_loss(logits, labels)
        nodes = list(masks)
        pnodes = list(outs)
        grads = torch.autograd.grad(loss, [masks[n] for n in nodes] + [outs[n] for n in pnodes])
    out = {n: (g.detach().reshape(1, -1) if masked[n] is None else g.detach().squeeze(masked[n]))
           for n, g in zip(nodes, grads)}
    out.update({n: g.detach() for n, g in zip(pnodes, grads[len(nodes):])})
    return out, labels
