"""ONNX backend: ``torch.onnx.export(dynamo=True)`` -> ``onnx.checker`` -> onnxruntime session.

The batch dimension stays dynamic where the graph allows (it comes from
``vitprune.ir.capture.export_program``). ``.export("m.onnx")`` writes the model with a vitprune
manifest in the ONNX ``metadata_props`` (key ``vitprune_manifest``); :class:`LoadedOnnx` reads it.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from typing import Any, Optional

import numpy as np
import torch
from torch.fx import GraphModule

from ..errors import BackendError, error_line
from ..files import atomic_write
from ..ir.capture import export_program
from .artefact import sha256_bytes, verify_hashes

MANIFEST_KEY = "vitprune_manifest"
OPSET = 18




def graph_hash(model) -> str:
    """SHA-256 of an ``onnx.ModelProto`` serialised without its ``metadata_props`` (where the manifest
    recording this hash lives): graph, weights, opsets."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.metadata_props[:]
    return sha256_bytes(m.SerializeToString())


def to_onnx_model(gm: GraphModule, example_inputs: tuple, dynamic_batch: bool = True, opset: int = OPSET):
    """Export a GraphModule to an in-memory ``onnx.ModelProto`` (weights embedded, checked).

    Input ``"images"`` ``[B, 3, H, W]`` float32, output ``"logits"`` ``[B, classes]``; ``B`` is
    symbolic when ``dynamic_batch`` and the graph allows it.

    Raises:
        BackendError: the exporter or ``onnx.checker`` rejects the graph (names the cause).
    """
    import onnx

    try:
        ep = export_program(gm, example_inputs, dynamic_batch=dynamic_batch)
    except Exception:
        if not dynamic_batch:
            raise
        ep = export_program(gm, example_inputs, dynamic_batch=False)  # graph fixes the batch size
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(ep, (example_inputs[0],), dynamo=True, opset_version=opset,
                                     input_names=["images"], output_names=["logits"], verbose=False,
                                     optimize=True)
        model = prog.model_proto
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        raise BackendError(f"ONNX export failed: {error_line(exc)}") from exc
    return model


def _session(model_bytes: bytes, threads: int, spin: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spin:                         # idle intra-op threads sleep instead of spinning (docs/decisions.md)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])


class _OrtRunner:
    """Shared ``__call__``: torch tensor in, torch tensor out (float32)."""

    session: Any

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32, copy=False))
        try:
            out = self.session.run(None, {self._input: arr})[0]
        except Exception as exc:
            raise BackendError(f"onnxruntime could not run input of shape {list(x.shape)} (the model takes "
                               f"{self.session.get_inputs()[0].shape}): {error_line(exc)}") from exc
        return torch.from_numpy(out)

    @property
    def _input(self) -> str:
        return self.session.get_inputs()[0].name


class OnnxModule(_OrtRunner):
    """A graph lowered to ONNX and run by onnxruntime on CPU with ``threads`` intra-op threads
    (``spin``: whether idle ones spin-wait, see :class:`OnnxBackend`)."""

    def __init__(self, model, threads: int, spin: bool = True):
        self.model = model
        self.threads = threads
        self.session = _session(model.SerializeToString(), threads, spin)

    def export(self, path: str, manifest: dict) -> str:
        """Write ``path`` (``.onnx``) with ``manifest`` in ``metadata_props`` (with the SHA-256 of the
        rest of the model, :func:`graph_hash`); atomic.

        Raises:
            DataError: ``path`` cannot be written.
        """
        import onnx

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        del m.metadata_props[:]
        man = dict(manifest, onnx_opset=OPSET, threads=self.threads, files={"graph": graph_hash(m)})
        entry = m.metadata_props.add()
        entry.key, entry.value = MANIFEST_KEY, json.dumps(man, default=str)
        with atomic_write(path, "artefact") as tmp:
            with open(tmp, "wb") as f:
                f.write(m.SerializeToString())
        return path


class LoadedOnnx(_OrtRunner):
    """An ``.onnx`` file loaded with no model code: ``[B, 3, H, W]`` -> logits.

    Args:
        trust: accepted for a uniform loader signature; ONNX holds no code, so it is never needed.

    Raises:
        UntrustedArtefactError: the model differs from the SHA-256 its manifest records.
        BackendError: the file is not a valid ONNX model, or keeps weights in external files.
    """

    def __init__(self, path: str, threads: Optional[int] = None, trust: bool = False):
        import onnx

        try:
            model = onnx.load(path, load_external_data=False)
            onnx.checker.check_model(model)
            if not model.graph.input:
                raise ValueError("graph has no inputs")
            if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
                raise ValueError("weights in external files (vitprune embeds them)")
        except Exception as exc:
            raise BackendError(f"{path} is not a valid ONNX model: {error_line(exc)}") from exc
        props = {p.key: p.value for p in model.metadata_props}
        try:
            self.manifest = json.loads(props[MANIFEST_KEY]) if MANIFEST_KEY in props else {}
        except ValueError:
            self.manifest = {}
        verify_hashes(path, self.manifest.get("files"), {"graph": graph_hash(model)})
        self.threads = threads or self.manifest.get("threads") or torch.get_num_threads()
        try:
            self.session = _session(model.SerializeToString(), self.threads)
        except Exception as exc:
            raise BackendError(f"onnxruntime cannot load {path}: {error_line(exc)}") from exc


class OnnxBackend:
    """``backend="onnx"``: options ``threads`` (default: torch's thread count),
    ``dynamic_batch`` (default True), ``opset`` (default 18) and ``spin`` (default True: idle intra-op
    threads spin-wait for the next op, onnxruntime's default and the fastest for a session that has
    the cores to itself; False: they sleep, for several sessions taking turns on the same cores, as
    when a pruned model is timed beside the unpruned one)."""

    name = "onnx"

    def lower(self, gm: GraphModule, example_inputs: tuple, threads: Optional[int] = None,
              dynamic_batch: bool = True, opset: int = OPSET, spin: bool = True, **options: Any) -> OnnxModule:
        if options:
            raise BackendError(f"onnx backend: unknown option(s) {sorted(options)}; "
                               "valid: threads, dynamic_batch, opset, spin")
        if not isinstance(spin, bool):
            raise BackendError(f"onnx backend: spin must be true or false, got {spin!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise BackendError(f"onnx backend: threads must be a positive integer, got {threads!r}")
        model = to_onnx_model(gm, example_inputs, dynamic_batch=dynamic_batch, opset=opset)
        return OnnxModule(model, threads or torch.get_num_threads(), spin)
