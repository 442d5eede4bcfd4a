"""Running and timing TVM libraries on a remote device over TVM RPC (:mod:`vitprune.devices`).

A library is exported here (cross-compiled for ``arm``), uploaded into the RPC server's work
folder, loaded there and wrapped in a Relax ``VirtualMachine`` whose device is the remote one;
inputs are copied to the device and outputs back per call. Timing uses TVM's ``time_evaluator``
on the device, so the numbers are the device's, not this machine's or the network's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Optional

import numpy as np

from ...errors import BackendError
from .targets import export_kwargs, target_family


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1][:200] if lines else ''}"


def open_session(device, target):
    """A session on one free device of ``device`` that can run libraries for ``target``.

    Raises:
        BackendError: as :meth:`vitprune.devices.Device.connect`, or the device does not match the
            target / this machine's TVM (:func:`vitprune.devices.check_compatible`).
    """
    from ...devices import check_compatible, device_info

    sess = device.connect()
    check_compatible(device_info(sess), target, str(device))
    return sess


def upload_library(sess, executable=None, library_path: Optional[str] = None, family: str = "cpu", target=None):
    """Upload a library (``library_path``, or ``executable`` exported now) and load it on the device.

    Returns:
        the remote ``runtime.Module``.

    Raises:
        BackendError: export (cross compiler missing), upload or load on the device failed.
    """
    tmpdir = None
    try:
        if library_path is None:
            tmpdir = tempfile.mkdtemp(prefix="vitprune-rpc-")
            library_path = os.path.join(tmpdir, "lib.so")
            executable.export_library(library_path, **export_kwargs(family, target))
        # a unique name: the device's dlopen would return an earlier library loaded from the same path
        name = f"vitprune-{os.getpid()}-{uuid.uuid4().hex[:12]}-{os.path.basename(library_path)}"
        sess.upload(library_path, name)
        return sess.load_module(name)
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001 - TVM RPC errors carry long remote tracebacks
        raise BackendError(f"could not load the library on the device: {_first_line(exc)}") from exc
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def remote_vm(device, target, executable=None, library_path: Optional[str] = None):
    """``(VirtualMachine, remote device, session)`` for a library on ``device`` (see :func:`upload_library`).

    Raises:
        BackendError: see :func:`open_session` and :func:`upload_library`.
    """
    from tvm import relax

    family = target_family(target)
    sess = open_session(device, target)
    lib = upload_library(sess, executable, library_path, family, target)
    dev = sess.cuda(0) if family == "cuda" else sess.cpu(0)
    try:
        return relax.VirtualMachine(lib, dev), dev, sess
    except Exception as exc:  # noqa: BLE001
        raise BackendError(f"could not start the Relax VM on the device {device}: {_first_line(exc)}") from exc


def time_vm(vm, dev, input_shape: tuple, repeat: int = 5, number: int = 1) -> dict:
    """Latency of ``vm["main"]`` on its device with ``time_evaluator`` (random input of ``input_shape``).

    Returns:
        ``{"median_ms", "min_ms", "repeats"}`` (each repeat is the mean of ``number`` calls, ms).
    """
    import tvm

    x = tvm.runtime.tensor(np.random.rand(*input_shape).astype("float32"), dev)
    res = vm.time_evaluator("main", dev, number=number, repeat=repeat)(x)
    ms = [1000.0 * float(r) for r in res.results]
    return {"median_ms": float(np.median(ms)), "min_ms": float(min(ms)), "repeats": len(ms)}


def create_session_fail_fast(rpc_config):
    """MetaSchedule ``f_create_session`` for ``RPCRunner``: TVM's own (``RPCConfig.connect_server``), but
    failing at once when no device is registered under the key any more (the device was lost), where
    the tracker would queue the request forever."""
    from ...devices import Device

    Device((rpc_config.tracker_host, int(rpc_config.tracker_port)), rpc_config.tracker_key).registered()
    return rpc_config.connect_server()


def alloc_argument_in_bounds(session, device, args_info, alloc_repeat: int) -> list:
    """MetaSchedule ``f_alloc_argument`` for ``RPCRunner``: floats random as TVM's default
    (``random_fill_for_measure`` on the device), integers zero. TVM's default fills index arguments
    (``take``/``gather`` of kept tokens) with random values too, which reads out of bounds, and a
    segfault in a session kills TVM's whole RPC server process, not only the session."""
    import tvm

    fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for info in args_info:
            if info[0] != "TENSOR":
                raise NotImplementedError(info)
            _, dtype, shape = info
            if str(dtype).startswith(("int", "uint", "bool")):
                args.append(tvm.runtime.tensor(np.zeros([int(s) for s in shape], dtype=str(dtype)), device))
            else:
                arr = tvm.runtime.empty([int(s) for s in shape], dtype=str(dtype), device=device)
                fill(arr)
                args.append(arr)
        repeated.append(args)
    return repeated
