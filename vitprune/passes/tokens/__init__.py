"""Token-reduction passes: Zero-TPrune (pruning and merging by Weighted PageRank importance and
similarity) and ToMe (bipartite token merging)."""

from .tome import ToMe
from .zero_tprune import ZeroTPrune, kept_token_indices

__all__ = ["ToMe", "ZeroTPrune", "kept_token_indices"]
