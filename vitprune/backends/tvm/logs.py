"""TVM's output, kept out of the user's terminal.

TVM's C++ runtime and compiler write ``LOG(WARNING)`` lines straight to file descriptor 2 (45 x "Fast mode
segfaults when there are out-of-bounds indices" per DeiT build, one "Scope Loaded" per constant when a
library is loaded) and MetaSchedule logs INFO/DEBUG to ``sys.stdout``. :func:`quiet` sends both, at the
file-descriptor level (``os.dup2``, so the builder and runner processes it starts inherit it), to
``$VITPRUNE_CACHE/logs/tvm.log``; Python's own ``sys.stderr`` (tqdm bars, vitprune's warnings) still reaches
the terminal. Afterwards the lines that mean something to a user (errors, failed tasks) are summarised in
one warning naming the log. ``VITPRUNE_VERBOSE=1`` (CLI ``--verbose``) lets everything through.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import sys
import tempfile
import threading
import warnings
from typing import Iterator

#: Lines that carry no information for a user (TVM_NOTES.md: the gather index is always in range).
NOISE = re.compile(r"Fast mode segfaults when there are out-of-bounds indices|Scope Loaded|Logging directory:")
#: Lines worth a summary.
PROBLEM = re.compile(r"\b(error|errors|failed|failure|exception|traceback)\b", re.IGNORECASE)

_depth = threading.local()


def verbose() -> bool:
    """True when ``VITPRUNE_VERBOSE`` is set to a true value (CLI ``--verbose``)."""
    return os.environ.get("VITPRUNE_VERBOSE", "").lower() in ("1", "true", "yes", "on")


def log_path() -> str:
    """``<cache>/logs/tvm.log`` (created), or a file in the temporary folder when the cache is not writable."""
    from .tuning import cache_root

    for folder in (os.path.join(cache_root(), "logs"), tempfile.gettempdir()):
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "tvm.log" if folder.endswith("logs") else f"vitprune-tvm-{os.getuid()}.log")
            with open(path, "a"):
                return path
        except OSError:
            continue
    return os.devnull


def problems(text: str) -> list[str]:
    """The lines of a TVM log that report a problem, without :data:`NOISE`."""
    return [ln.strip() for ln in text.splitlines() if PROBLEM.search(ln) and not NOISE.search(ln)]


class _Redirect:
    """The process-wide redirection: made by the first :func:`quiet` to enter, undone by the last to leave
    (file descriptors and ``sys.stdout`` belong to the process, not to a thread)."""

    lock = threading.Lock()
    users = 0
    saved: tuple = ()
    py: tuple = ()
    log = console = None

    @classmethod
    def enter(cls, path: str) -> None:
        with cls.lock:
            cls.users += 1
            if cls.users > 1:
                return
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            cls.log = open(path, "a")
            cls.saved = os.dup(1), os.dup(2)
            cls.py = sys.stdout, sys.stderr
            cls.console = io.TextIOWrapper(os.fdopen(os.dup(cls.saved[1]), "wb", buffering=0), write_through=True)
            os.dup2(cls.log.fileno(), 1)
            os.dup2(cls.log.fileno(), 2)
            sys.stdout, sys.stderr = cls.log, cls.console

    @classmethod
    def leave(cls) -> None:
        with cls.lock:
            cls.users -= 1
            if cls.users:
                return
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(cls.saved[0], 1)
            os.dup2(cls.saved[1], 2)
            for fd in cls.saved:
                os.close(fd)
            sys.stdout, sys.stderr = cls.py
            cls.console.close()
            cls.log.close()


@contextlib.contextmanager
def quiet(what: str = "TVM") -> Iterator[None]:
    """Route TVM's output (fd 1 and 2, and ``sys.stdout``) to :func:`log_path` while the block runs; then
    warn once if it logged problems. Re-entrant and safe from several threads; does nothing when
    :func:`verbose`."""
    if verbose() or getattr(_depth, "n", 0):
        yield
        return
    _depth.n = 1
    path = log_path()
    start = os.path.getsize(path) if os.path.exists(path) else 0
    _Redirect.enter(path)
    try:
        yield
    finally:
        _Redirect.leave()
        _depth.n = 0
        _summarise(what, path, start)


def _summarise(what: str, path: str, start: int) -> None:
    try:
        with open(path, errors="replace") as f:
            f.seek(start)
            found = problems(f.read())
    except OSError:
        return
    if found:
        first = found[0] if len(found[0]) <= 160 else found[0][:157] + "..."
        warnings.warn(f"{what}: TVM logged {len(found)} problem line(s), e.g. {first!r}; full log: {path} "
                      f"(--verbose / VITPRUNE_VERBOSE=1 shows it live)", stacklevel=4)


def quieted(fn):
    """Decorator: run ``fn`` inside :func:`quiet`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with quiet(f"TVM ({fn.__qualname__})"):
            return fn(*args, **kwargs)

    return wrapper
