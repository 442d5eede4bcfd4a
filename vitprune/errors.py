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


class PassError(VitpruneError):
    """A pass failed on a graph for a reason other than its configuration (the message names the
    pass and the passes that ran before it)."""


def error_line(exc: BaseException, last: bool = False) -> str:
    """``"<ExceptionType>: <first line of its message>"`` (``last=True``: the last non-empty line,
    where TVM puts the cause): how a wrapped library error is quoted in one of our messages."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = (lines[-1] if last else lines[0]) if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class UntrustedArtefactError(BackendError):
    """An artefact whose format can run code on load was given without ``trust=True``, or its
    files do not match the SHA-256 its manifest records."""


class SweepError(VitpruneError):
    """A sweep cannot run: bad options, unreachable storage, or a stored study made with other inputs."""
