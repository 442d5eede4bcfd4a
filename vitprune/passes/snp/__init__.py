"""SNP structured neuron pruning and head pruning: planning (widths, presets, allocation,
sensitivity), the block-by-block engine, weight surgery, embedding pruning, and SNP's
numerics (least squares, Fisher information, neuron scores)."""

from .head_prune import HeadPrune
from .snp import SNP

__all__ = ["HeadPrune", "SNP"]
