"""Writing files atomically: a hidden temporary name beside the target, renamed into place when
complete, removed on failure; temporaries left by processes that died (kill -9) are removed on the
next write into the same folder. Used by every exporter and every cache (DESIGN.md "Caches are
explicit")."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from typing import Iterator

from .errors import DataError

#: ``.<name>.tmp-<pid><suffix>`` (this module) and ``.tmp-<pid>-<name>`` (vitprune <= 0.x exports).
_LEGACY_TMP = re.compile(r"^\.tmp-(\d+)-")


def left_by_dead_process(name: str, sep: str = ".tmp-") -> bool:
    """True if file name ``name`` is ``<anything><sep><pid>[.<ext>]`` (or the older ``.tmp-<pid>-<name>``)
    and process ``pid`` no longer exists."""
    if sep not in name:
        return False
    legacy = _LEGACY_TMP.match(name) if sep == ".tmp-" else None
    pid = legacy.group(1) if legacy else name.rpartition(sep)[2].split(".")[0]
    return pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(folder: str) -> None:
    """Delete files in ``folder`` that a dead process left while writing them atomically."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if left_by_dead_process(name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def temporary_name(path: str) -> str:
    """The hidden temporary ``<folder>/.<name>.tmp-<pid><suffix>`` that :func:`atomic_write` writes
    first (the suffix kept: some writers pick the format from it)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}{os.path.splitext(name)[1]}")


def check_writable(path: str, what: str = "output") -> None:
    """Refuse an output path that cannot be written, before any work.

    Raises:
        DataError: ``path`` names a folder, its folder does not exist, or it is not writable.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise DataError(f"{what} {path} is a folder; give a file name inside it")
    if not os.path.isdir(folder):
        raise DataError(f"cannot write {what} {path}: folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"cannot write {what} {path}: folder {folder} is not writable")


def check_folder(folder: str, what: str) -> str:
    """Create ``folder`` if needed and check it can be written; return it.

    Raises:
        DataError: it is a file, or cannot be created or written.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DataError(f"{what} {folder} is a file, not a folder; point it at a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {what} {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{what} {folder} is not writable; point it at a folder you can write")
    return folder


@contextlib.contextmanager
def atomic_write(path: str, what: str = "output") -> Iterator[str]:
    """Yield a temporary path to write; on success it is renamed to ``path``, on any error removed,
    so ``path`` is either the old file or the complete new one. Temporaries of dead processes in
    the same folder are removed first.

    Raises:
        DataError: ``path`` cannot be written (names ``path``, never the temporary).
    """
    check_writable(path, what)
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EISDIR, errno.ENOENT, errno.EPERM):
            raise DataError(f"cannot write {what} {path}: {os.strerror(exc.errno)}") from None
        raise
    finally:
        if os.path.lexists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)


def write_text(path: str, text: str, what: str = "output") -> str:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`); return ``path``."""
    with atomic_write(path, what) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    return path


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
