"""Test helpers: run a compiled graph through onnxruntime or TVM (llvm) directly, independently
of vitprune's own backends, so pass tests check that their graphs lower."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def onnxruntime_run(gm: torch.nn.Module, x: torch.Tensor, path: str) -> tuple[np.ndarray, set]:
    """Export ``gm`` with the dynamo ONNX exporter to ``path`` and run it on ``x`` in onnxruntime.

    Returns:
        the first output ``[B, classes]`` and the set of ONNX op types in the file.
    """
    import onnx
    import onnxruntime as ort

    ep = torch.export.export(gm, (x,), strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ep, (x,), path, dynamo=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return out, {n.op_type for n in onnx.load(path).graph.node}


def tvm_run(gm: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Import ``gm`` with TVM's exported-program frontend, build for llvm, run on ``x``."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(gm, (x,), strict=False)
    ex = tvm.compile(from_exported_program(ep), target="llvm")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    out = out[0] if not hasattr(out, "numpy") else out
    return out.numpy()


__all__ = ["onnxruntime_run", "tvm_run"]
