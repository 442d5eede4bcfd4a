"""Graph passes. Each module registers its pass under a name usable in ``--pass`` specs."""

from .base import PASS_REGISTRY, Pass, PassContext, parse_pass_spec, register_pass
from .explicit_attention import ExplicitAttention

__all__ = ["PASS_REGISTRY", "Pass", "PassContext", "parse_pass_spec", "register_pass", "ExplicitAttention"]
from .snp import SNP  # noqa: E402
from .head_prune import HeadPrune  # noqa: E402
