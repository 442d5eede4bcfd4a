"""Exception types raised by vitprune.

Every error says what was found and what to do about it. Catch :class:`VitpruneError`
to handle all of them.
"""


class VitpruneError(Exception):
    """Base class of every error vitprune raises on bad input."""


class UnsupportedModelError(VitpruneError):
    """The model cannot be captured, or has no attention layer vitprune recognises."""


class InvalidPassConfigError(VitpruneError, ValueError):
    """A pass was given a configuration value outside its valid range, or an unknown key."""


class BackendError(VitpruneError):
    """A backend could not lower, build or run the graph (unknown target, missing tool, ...)."""


class DataError(VitpruneError):
    """A data folder, an image file or a weights file is missing, empty or malformed."""


class ParityError(VitpruneError):
    """A lowered module's outputs differ from eager PyTorch beyond the tolerance."""


class SweepError(VitpruneError):
    """A sweep cannot run: bad options, unreachable storage, or a stored study made with other inputs."""
