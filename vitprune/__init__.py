"""vitprune: a compiler that makes pre-trained Vision Transformers faster without fine-tuning.

``vitprune.compile(model, passes=[...], backend=..., example_inputs=x)`` captures the model
into a torch.fx graph, runs pruning passes over its attention sites, lowers the result to a
backend and returns a callable :class:`CompiledModule`; ``vitprune.load(path, trust=...)`` reads
back an exported artefact (``.pt2`` and ``.so`` can run code and need ``trust=True``: docs/security.md).
"""

from ._version import __version__
from . import errors, passes  # noqa: E402
from .api import CompiledModule, CompileReport, compile  # noqa: E402
from .backends import load  # noqa: E402
from .ir import capture, find_attention_sites  # noqa: E402
from .passes import ExplicitAttention, Pass, PassContext  # noqa: E402
from .pipeline import PIPELINES, load_config, save_config  # noqa: E402
from .sweep import sweep  # noqa: E402  (after the imports above; the function shadows the module name)

__all__ = [
    "compile", "load", "CompiledModule", "CompileReport", "capture", "find_attention_sites",
    "Pass", "PassContext", "ExplicitAttention", "errors", "passes", "sweep", "__version__",
    "PIPELINES", "load_config", "save_config",
]
