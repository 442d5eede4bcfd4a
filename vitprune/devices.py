"""Devices: where a TVM library is tuned, evaluated and timed: this machine, or boards behind TVM's
RPC tracker (a Raspberry Pi, a Jetson, the emulated arm64 device of ``scripts/arm64-device``).

Everything remote goes through TVM's own RPC stack: ``tvm.rpc`` tracker and server
(``python -m tvm.exec.rpc_tracker`` / ``rpc_server``), sessions requested from the tracker by key,
and MetaSchedule's ``RPCRunner`` for tuning, which measures on every device registered under the
key in parallel. A :class:`Device` only names the tracker and the key and knows how to ask for them.

    dev = vitprune.devices.remote("127.0.0.1:9190", "rpi4")
    compiled = vitprune.compile(model, passes, backend="tvm", target="arm", device=dev, tune=True)

Raises :class:`~vitprune.errors.BackendError` with one line for: a tracker that does not answer
(the address, and how to start one), a key no device is registered under (the keys there are), no
free device within the timeout, and a device whose TVM build or CPU does not match the library.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Optional

from .errors import BackendError

DEFAULT_TRACKER_PORT = 9190
DEFAULT_SERVER_PORT = 9090
START_TRACKER = "vitprune device tracker --port {port}` or `python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port {port}"
ARCH_OF_FAMILY = {"arm": "aarch64", "cpu": None, "cuda": None}


def parse_address(text: str, default_port: int = DEFAULT_TRACKER_PORT) -> tuple[str, int]:
    """``"HOST:PORT"`` (or ``"HOST"``) -> ``(host, port)``.

    Raises:
        BackendError: not of that form.
    """
    host, _, port = str(text).strip().rpartition(":")
    if not host:
        host, port = port, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendError(f"tracker address {text!r} is not HOST:PORT (e.g. 127.0.0.1:{default_port})")
    return host, int(port)


def connect_tracker(address, timeout: float = 5.0):
    """A ``tvm.rpc.TrackerSession`` to the tracker at ``address`` (``"HOST:PORT"`` or a tuple).

    Raises:
        BackendError: nothing answers there within ``timeout`` seconds (says how to start a tracker),
            or what answers is not a TVM RPC tracker.
    """
    from tvm import rpc

    host, port = parse_address(address) if isinstance(address, str) else address
    try:  # TVM's own connect retries for a minute; probe first so a wrong address fails at once
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise BackendError(f"no RPC tracker answers at {host}:{port} ({exc.strerror or type(exc).__name__}); start one "
                           f"with `{START_TRACKER.format(port=port)}` (or pass the right --tracker HOST:PORT)") from exc
    try:
        return rpc.connect_tracker(host, port)
    except Exception as exc:  # noqa: BLE001 - TVM raises RuntimeError("... is not RPC Tracker")
        raise BackendError(f"{host}:{port} answers but is not a TVM RPC tracker: {exc}") from exc


def tracker_summary(address) -> list[dict]:
    """The devices registered with a tracker, one row per key.

    Returns:
        ``[{"key", "total", "free", "pending", "servers": ["host:port", ...]}]`` sorted by key;
        ``free`` counts devices not in a session now, ``pending`` requests waiting for one.

    Raises:
        BackendError: the tracker does not answer (see :func:`connect_tracker`).
    """
    sess = connect_tracker(address)
    try:
        data = sess.summary()
    finally:
        sess.close()
    rows: dict = {}
    for item in data.get("server_info", []):
        key = item["key"].split(":", 1)[-1]  # "server:rpi4" -> "rpi4"
        row = rows.setdefault(key, {"key": key, "total": 0, "free": 0, "pending": 0, "servers": []})
        row["total"] += 1
        row["servers"].append(":".join(map(str, item["addr"])))
    for key, q in data.get("queue_info", {}).items():
        row = rows.setdefault(key, {"key": key, "total": 0, "free": 0, "pending": 0, "servers": []})
        row["free"], row["pending"] = int(q.get("free", 0)), int(q.get("pending", 0))
    return [rows[k] for k in sorted(rows) if rows[k]["total"] or rows[k]["pending"]]  # as TVM's text_summary


@dataclass(frozen=True)
class Device:
    """Where TVM libraries run: this machine (``tracker is None``) or any device registered with the
    RPC tracker at ``tracker`` under ``key``.

    Attributes:
        tracker: ``(host, port)`` of the tracker, or None for this machine.
        key: the device key the servers registered with (``vitprune device serve --key``).
        timeout: seconds to wait for a free device before giving up.
        session_timeout: seconds one measurement session (upload, load, run) may take; an
            emulated device needs more than a real board.
    """

    tracker: Optional[tuple] = None
    key: Optional[str] = None
    timeout: float = 60.0
    session_timeout: float = 60.0

    @property
    def is_remote(self) -> bool:
        return self.tracker is not None

    def __str__(self) -> str:
        return f"{self.key}@{self.tracker[0]}:{self.tracker[1]}" if self.is_remote else "local"

    def registered(self) -> dict:
        """This key's row of :func:`tracker_summary`.

        Raises:
            BackendError: no device is registered under the key (names the keys that are).
        """
        rows = tracker_summary(self.tracker)
        for row in rows:
            if row["key"] == self.key and row["total"]:
                return row
        have = ", ".join(f"{r['key']} ({r['total']})" for r in rows if r["total"]) or "none"
        raise BackendError(f"no device is registered under key {self.key!r} at tracker {self.tracker[0]}:"
                           f"{self.tracker[1]} (keys there: {have}); start one on the board with "
                           f"`vitprune device serve --tracker {self.tracker[0]}:{self.tracker[1]} --key {self.key}`")

    def connect(self):
        """An ``RPCSession`` on one free device of this key (waits up to ``timeout`` s for one).

        Raises:
            BackendError: no device under the key, or none free within ``timeout`` seconds.
        """
        if not self.is_remote:
            from tvm import rpc

            return rpc.LocalSession()
        deadline = time.time() + self.timeout
        while True:
            row = self.registered()
            if row["free"] > 0:
                break
            if time.time() >= deadline:
                raise BackendError(f"no free device under key {self.key!r} at {self}: all {row['total']} busy for "
                                   f"{self.timeout:.0f} s ({row['pending']} requests waiting); retry later or "
                                   f"raise the timeout")
            time.sleep(0.5)
        sess = connect_tracker(self.tracker)
        try:
            sess._sock.settimeout(max(1.0, deadline - time.time()))
            return sess.request(self.key, priority=1, session_timeout=0, max_retry=1)
        except Exception as exc:  # noqa: BLE001 - socket timeout or TVM's RuntimeError
            raise BackendError(f"no free device under key {self.key!r} at {self} within {self.timeout:.0f} s "
                               f"({type(exc).__name__}); retry later or raise the timeout") from exc
        finally:
            sess.close()

    def count(self) -> int:
        """Devices registered under the key (1 for this machine)."""
        return self.registered()["total"] if self.is_remote else 1

    def rpc_config(self):
        """MetaSchedule ``RPCConfig`` for this device's tracker and key."""
        from tvm.s_tir.meta_schedule.runner import RPCConfig

        return RPCConfig(tracker_host=self.tracker[0], tracker_port=self.tracker[1], tracker_key=self.key,
                         session_priority=1, session_timeout_sec=int(self.session_timeout))


def local() -> Device:
    """This machine."""
    return Device()


def remote(tracker: str, key: str, timeout: float = 60.0, session_timeout: float = 60.0) -> Device:
    """The devices registered under ``key`` with the tracker at ``tracker`` (``"HOST:PORT"``).

    Raises:
        BackendError: the tracker does not answer, or has no device under ``key``.
    """
    if not key:
        raise BackendError("a remote device needs a key (--device-key), the one its server registered with")
    dev = Device(parse_address(tracker), str(key), float(timeout), float(session_timeout))
    dev.registered()
    return dev


def from_flags(tracker: Optional[str], key: Optional[str], backend: str, timeout: float = 60.0) -> Optional[Device]:
    """The device that ``--tracker HOST:PORT --device-key K`` name for ``--backend backend``, or None
    when neither flag is given (the local machine).

    Raises:
        BackendError: only one of the two given, a backend other than ``tvm``, or :func:`remote`'s errors.
    """
    if not tracker and not key:
        return None
    if not tracker or not key:
        raise BackendError("--tracker HOST:PORT and --device-key K go together (the tracker and the key its "
                           "devices registered with)")
    if backend != "tvm":
        raise BackendError(f"--tracker applies to --backend tvm only (it measures over TVM RPC), got --backend {backend}")
    return remote(tracker, key, timeout=timeout, session_timeout=max(timeout, 60.0))


def device_info(session) -> dict:
    """What a connected device runs: ``{"triple", "cpu", "llvm"}`` (None where unknown).

    TVM's runtime reports no version over RPC; the LLVM major version its build links is the part
    of the build that can be asked for (a runtime-only TVM on a board reports none of these).
    """
    def call(name):
        try:
            return str(session.get_function(name)())
        except Exception:  # noqa: BLE001 - a runtime-only TVM build lacks the LLVM functions
            return None

    return {"triple": call("target.llvm_get_system_triple"), "cpu": call("target.llvm_get_system_cpu"),
            "llvm": call("target.llvm_version_major")}


def is_emulated(info: dict, key: Optional[str] = None) -> bool:
    """True for an emulated device: the key says so (``scripts/arm64-device`` registers
    ``arm64-emulated``), or LLVM sees no real CPU model on an aarch64 device (qemu-user: ``generic``)."""
    return "emulated" in str(key or "") or (str(info.get("triple", "")).startswith("aarch64")
                                             and info.get("cpu") in ("generic", None))


def check_compatible(info: dict, target, where: str) -> None:
    """Raise if the device described by ``info`` (:func:`device_info`) cannot run libraries built
    here for ``target``.

    Raises:
        BackendError: the device's TVM is another build than this machine's (its LLVM differs), or
            its CPU architecture is not the target's (names both).
    """
    import platform

    import tvm

    from .backends.tvm.targets import target_family

    here = str(tvm.get_global_func("target.llvm_version_major")())
    if info.get("llvm") and info["llvm"] != here:
        raise BackendError(f"device {where} runs another TVM build (LLVM {info['llvm']}) than this machine "
                           f"(TVM {tvm.__version__}, LLVM {here}); install apache-tvm=={tvm.__version__} on the device")
    family = target_family(target)
    want = ARCH_OF_FAMILY.get(family) or platform.machine().lower()
    triple = info.get("triple") or ""
    if family != "cuda" and triple and not triple.startswith(want):
        mtriple = target.attrs["mtriple"] if "mtriple" in target.attrs else want
        raise BackendError(f"device {where} is {triple.split('-')[0]} ({triple}) but the library is built for "
                           f"target {family!r} ({mtriple}); use --target "
                           f"{'arm' if triple.startswith('aarch64') else 'cpu'} for this device")


def start_tracker(host: str = "127.0.0.1", port: int = DEFAULT_TRACKER_PORT, port_end: Optional[int] = None):
    """Start TVM's RPC tracker in a child process (``tvm.rpc.tracker.Tracker``); ``.port`` is the port
    it bound (the first free one in ``[port, port_end)``), ``.terminate()`` stops it."""
    from tvm.rpc.tracker import Tracker

    return Tracker(host, port=port, port_end=port_end or port + 10, silent=True)


def serve(tracker: Optional[str], key: str, host: str = "127.0.0.1", port: int = DEFAULT_SERVER_PORT,
          port_end: Optional[int] = None) -> None:
    """Run TVM's RPC server for this machine (``tvm.rpc.Server``), registered under ``key`` with the
    tracker at ``tracker``, in the foreground until interrupted.

    Raises:
        BackendError: the tracker does not answer, or no key is given.
    """
    from tvm import rpc

    if not key:
        raise BackendError("device serve needs --key NAME (the device type, e.g. rpi4 or jetson-orin)")
    addr = None
    if tracker:
        addr = parse_address(tracker)
        connect_tracker(addr).close()
    server = rpc.Server(host, port, port_end or port + 100, key=key, tracker_addr=addr, silent=True)
    print(f"RPC server for key {key!r} on {host}:{server.port}" + (f", registered with tracker {addr[0]}:{addr[1]}"
                                                                 if addr else "") + "; Ctrl-C stops it", flush=True)
    run_until_stopped(server)


def run_until_stopped(child) -> None:
    """Wait on a TVM tracker/server child (``.proc.join()``) until it exits or this process gets
    Ctrl-C or SIGTERM, then stop the child (killing only this process would leave it running)."""
    import signal

    def _stop(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _stop)
    try:
        child.proc.join()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        child.terminate()
