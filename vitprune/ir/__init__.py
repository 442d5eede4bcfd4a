"""The IR: captured torch.fx GraphModules and the attention sites found in them."""

from .capture import capture, export_program, recapture
from .match import find_attention_sites
from .sites import AttentionSite, LinearRef

__all__ = ["capture", "export_program", "recapture", "find_attention_sites", "AttentionSite", "LinearRef"]
