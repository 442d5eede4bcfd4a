"""FLOPs counting with ``torch.utils.flop_counter``, reported as GMACs.

Convention (DESIGN.md): we report multiply-accumulates as "GMACs" (fvcore convention, what
the papers call "GFLOPs": DeiT-T 1.25, DeiT-S 4.6). ``FlopCounterMode`` counts 2 FLOPs per
MAC, so GMACs = FLOPs / 2 / 1e9.

``FlopCounterMode`` has no formula for the fused CPU attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) and would silently count attention as
free (DeiT-T: 1.075 instead of 1.254 GMACs). We register the standard SDPA formula for it,
so attention is counted however it is computed: ``2·N²·d`` MACs per head (q @ k^T and
probs @ v).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

aten = torch.ops.aten


def _register_cpu_sdpa() -> None:
    op = aten._scaled_dot_product_flash_attention_for_cpu
    from torch.utils.flop_counter import flop_registry

    if op in flop_registry or op.default in flop_registry:
        return

    @register_flop_formula(op, get_raw=True)
    def _cpu_flash_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)


_register_cpu_sdpa()


def count_flops(fn, example_inputs) -> int:
    """FLOPs (2 per MAC) of one call ``fn(*example_inputs)``, attention included.

    Args:
        fn: a module or callable taking ``example_inputs``.
        example_inputs: tuple of tensors, typically ``([B, 3, H, W],)``.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*example_inputs)
    return counter.get_total_flops()


def gmacs(fn, image_shape=(3, 224, 224)) -> float:
    """GMACs per image of ``fn`` (a module mapping ``[B, 3, H, W]`` to logits), batch 1.

    Returns:
        MACs / 1e9 for one image (the papers' "GFLOPs").
    """
    x = torch.zeros(1, *image_shape)
    return count_flops(fn, (x,)) / 2 / 1e9
