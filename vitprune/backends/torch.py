"""PyTorch backend: run the GraphModule eagerly or through ``torch.compile``; export ``.pt2``."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import torch
from torch.fx import GraphModule

from ..errors import BackendError, UntrustedArtefactError, error_line
from ..files import atomic_write
from ..ir.capture import check_image_batch, export_program
from .artefact import require_trust, sha256_bytes, verify_hashes

MANIFEST_KEY = "vitprune_manifest.json"


class TorchModule:
    """A GraphModule run eagerly (``mode="eager"``) or compiled (``mode="compile"``).

    Call with ``[B, 3, H, W]`` float32 images; returns logits ``[B, num_classes]``.
    """

    def __init__(self, gm: GraphModule, example_inputs: tuple, mode: str = "eager"):
        if mode not in ("eager", "compile"):
            raise BackendError(f"torch backend: mode must be 'eager' or 'compile', got {mode!r}")
        self.gm = gm
        self.example_inputs = example_inputs
        self.mode = mode
        self._fn = torch.compile(gm, dynamic=False) if mode == "compile" else gm

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def export(self, path: str, manifest: dict) -> str:
        """Write a torch.export archive (``.pt2``) with the manifest as an extra file."""
        return save_pt2(self.gm, self.example_inputs, path, manifest)


def save_pt2(gm: GraphModule, example_inputs: tuple, path: str, manifest: dict) -> str:
    """Export ``gm`` (dynamic batch) to a ``.pt2`` archive at ``path``; written atomically.

    The manifest is the archive member ``<archive>/extra/vitprune_manifest.json`` and records the
    SHA-256 of every other member (``files``), which :class:`LoadedPt2` checks.

    Raises:
        DataError: ``path`` cannot be written (missing or read-only folder, a folder name).
        BackendError: torch.export fails.
    """
    ep = export_program(gm, example_inputs)
    with atomic_write(path, "artefact") as tmp:
        try:
            with open(tmp, "wb") as f:  # a file object: the archive's folder is "archive", not the temporary name
                torch.export.save(ep, f)
        except OSError:
            raise  # atomic_write turns it into one line naming path
        except Exception as exc:
            raise BackendError(f"torch.export.save({path}) failed: {error_line(exc).replace(tmp, path)}") from exc
        with zipfile.ZipFile(tmp, "a") as z:
            files = _member_hashes(z)
            root = next(iter(files)).split("/")[0]
            z.writestr(f"{root}/extra/{MANIFEST_KEY}", json.dumps(dict(manifest, files=files), default=str))
    return path


def _member_hashes(z: zipfile.ZipFile) -> dict:
    """SHA-256 of every member of a ``.pt2`` archive but the vitprune manifest."""
    return {i.filename: sha256_bytes(z.read(i)) for i in z.infolist() if not i.filename.endswith("/" + MANIFEST_KEY)}


def read_pt2_manifest(path: str, data: bytes) -> tuple[dict, dict]:
    """(manifest, SHA-256 of each other member) of the ``.pt2`` bytes ``data`` read from ``path``, read
    with :mod:`zipfile` only (no unpickling).

    Raises:
        BackendError: not a zip archive.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if len(set(z.namelist())) != len(z.namelist()):  # which copy a reader takes is unspecified
                raise UntrustedArtefactError(f"refusing to load {path}: the archive holds two members of one name")
            names = [n for n in z.namelist() if n.endswith("/extra/" + MANIFEST_KEY)]
            manifest = json.loads(z.read(names[0])) if names else {}
            return manifest, _member_hashes(z)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise BackendError(f"{path} is not a readable torch.export archive (.pt2): {error_line(exc)}") from exc


class LoadedPt2:
    """A ``.pt2`` archive loaded with no model code: ``[B, 3, H, W]`` -> logits.

    Args:
        trust: the archive can run code when loaded (docs/security.md); without ``trust=True`` it is refused.

    Raises:
        UntrustedArtefactError: ``trust`` is False, or a member differs from the SHA-256 the manifest records.
        BackendError: not a torch.export archive.
    """

    def __init__(self, path: str, trust: bool = False):
        require_trust(path, trust)
        with open(path, "rb") as f:  # one read: the bytes checked are the bytes loaded
            data = f.read()
        self.manifest, hashes = read_pt2_manifest(path, data)
        verify_hashes(path, self.manifest.get("files"), hashes)
        try:
            ep = torch.export.load(io.BytesIO(data))
        except Exception as exc:
            raise BackendError(f"{path} is not a readable torch.export archive (.pt2): {error_line(exc)}") from exc
        self.module = ep.module()
        self.path = path

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.manifest.get("input_shape"):
            check_image_batch(x, self.manifest["input_shape"][1:], self.path)
        return self.module(x)


class TorchBackend:
    """``backend="torch"``: options ``mode="eager"`` (default) or ``"compile"``."""

    name = "torch"

    def lower(self, gm: GraphModule, example_inputs: tuple, mode: str = "eager", **options: Any) -> TorchModule:
        if options:
            raise BackendError(f"torch backend: unknown option(s) {sorted(options)}; valid: mode")
        return TorchModule(gm, example_inputs, mode=mode)
