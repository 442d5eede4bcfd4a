"""Graph passes. Each module registers its pass under a name usable in ``--pass`` specs."""

from .base import PASS_REGISTRY, Pass, PassContext, parse_pass_spec, register_pass
from .explicit_attention import ExplicitAttention
from .snp import SNP, HeadPrune
from .tokens import ToMe, ZeroTPrune, kept_token_indices
from .compose import SNPTokens

__all__ = [
    "PASS_REGISTRY", "Pass", "PassContext", "parse_pass_spec", "register_pass",
    "ExplicitAttention", "HeadPrune", "SNP", "SNPTokens", "ToMe", "ZeroTPrune", "kept_token_indices",
]
