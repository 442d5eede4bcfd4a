"""The trust model of exported artefacts (docs/security.md).

Formats whose loading can run code, ``.pt2`` (torch.export's loader falls back to unpickling with
``weights_only=False``) and ``.so`` (native code, run by ``dlopen``), load only when the caller says it
trusts the file (``trust=True``, CLI ``--trust``); ``.onnx`` is data only (protobuf) and loads without.
Every artefact's manifest records the SHA-256 of each of its files (:func:`file_hashes`) and loading
checks them (:func:`verify_hashes`) before any byte is handed to torch, onnxruntime or TVM, so an edited
file or a hand-written manifest is refused. The hashes detect corruption and tampering of one part;
they are not a signature: whoever can rewrite both the file and its manifest is stopped only by
``trust=False``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping

from ..errors import UntrustedArtefactError

#: Why each format can run code when loaded.
RUNS_CODE = {
    ".pt2": "a .pt2 archive can run code when loaded (torch.export's loader unpickles parts of it "
            "with weights_only=False)",
    ".so": "a .so library is native code, run as soon as it is loaded",
}


def require_trust(path: str, trust: bool) -> None:
    """Refuse ``path`` when its format can run code (:data:`RUNS_CODE`) and ``trust`` is False.

    Raises:
        UntrustedArtefactError: one line saying why and how to load it anyway.
    """
    why = RUNS_CODE.get(os.path.splitext(path)[1].lower())
    if why and not trust:
        raise UntrustedArtefactError(
            f"refusing to load {path}: {why}; load it only if you made it or trust who did, with "
            f"vitprune.load(path, trust=True) or --trust (or export to .onnx, which holds no code)")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_hashes(path: str, recorded, actual: Mapping[str, str]) -> None:
    """Compare the manifest's ``recorded`` ``{file: sha256}`` with the ``actual`` hashes of the
    artefact's files.

    Raises:
        UntrustedArtefactError: no hashes recorded, or a file missing, added or changed (names it).
    """
    if not isinstance(recorded, dict) or not recorded:
        raise UntrustedArtefactError(
            f"refusing to load {path}: its manifest records no SHA-256 of its files (not written by this "
            f"vitprune, or edited); re-export it")
    changed = sorted(k for k in recorded.keys() & actual.keys() if recorded[k] != actual[k])
    missing, added = sorted(recorded.keys() - actual.keys()), sorted(actual.keys() - recorded.keys())
    if changed or missing or added:
        what = "; ".join(f"{label} {', '.join(names[:3])}" for label, names in
                         (("changed", changed), ("missing", missing), ("not in the manifest", added)) if names)
        raise UntrustedArtefactError(f"refusing to load {path}: its files do not match the SHA-256 its manifest "
                                     f"records ({what}): it was edited or corrupted after export; re-export it")
