"""TVM targets by name: ``cpu`` (host llvm), ``cuda`` (an NVIDIA arch) and ``arm`` (aarch64 + NEON).

TVM 0.27 takes targets as JSON dicts (TVM_NOTES.md §1, §4). :func:`resolve_target` turns a short
name plus overrides into a ``tvm.target.Target`` and checks what TVM itself does not (CUDA arch
numbers, the cross compiler for ARM), so the user gets a one-line error instead of a build trace.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from ...errors import BackendError

TARGET_NAMES = ("cpu", "cuda", "arm")
ALIASES = {"llvm": "cpu", "x86": "cpu", "host": "cpu", "gpu": "cuda", "aarch64": "arm", "arm64": "arm"}

# Compute capabilities NVIDIA has shipped (sm_XY); suffixes a/f are arch-specific feature sets.
CUDA_ARCHS = {"50", "52", "53", "60", "61", "62", "70", "72", "75", "80", "86", "87", "88", "89", "90",
              "100", "101", "103", "110", "120", "121"}
DEFAULT_CUDA_ARCH = "sm_80"
ARM_TRIPLE = "aarch64-linux-gnu"
ARM_DEFAULT_MCPU = "cortex-a76"
ARM_DEFAULT_CORES = 4
ARM_CROSS_CXX = "aarch64-linux-gnu-g++"
ARM_APT = "apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"
# Board presets (docs/devices.md): name -> (target, overrides, aarch64 host CPU for CUDA boards)
BOARDS = {
    "rpi4": ("arm", {"mcpu": "cortex-a72"}, None),         # Raspberry Pi 4 (BCM2711)
    "rpi5": ("arm", {"mcpu": "cortex-a76"}, None),         # Raspberry Pi 5 (BCM2712)
    "jetson-nano": ("cuda", {"arch": "sm_53"}, "cortex-a57"),
    "jetson-xavier": ("cuda", {"arch": "sm_72"}, "carmel"),
    "jetson-orin": ("cuda", {"arch": "sm_87"}, "cortex-a78ae"),
}


def default_threads() -> int:
    """Threads TVM uses at run time: ``TVM_NUM_THREADS`` if set, else torch's intra-op thread count."""
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    import torch

    return max(1, torch.get_num_threads())


def host_mcpu() -> str:
    """LLVM's name for this machine's CPU (e.g. ``znver4``), used as the llvm target's ``mcpu``."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def check_cuda_arch(arch: str) -> str:
    """Return ``arch`` if it names a real NVIDIA compute capability (``sm_80``, ``sm_90a``).

    Raises:
        BackendError: anything else (``sm_13``, ``foo``), listing the valid ones.
    """
    m = re.fullmatch(r"sm_(\d+)([af]?)", str(arch))
    if not m or m.group(1) not in CUDA_ARCHS:
        valid = ", ".join(f"sm_{a}" for a in sorted(CUDA_ARCHS, key=int))
        raise BackendError(f"CUDA arch {arch!r} is not an NVIDIA compute capability; use one of {valid} "
                           f"(e.g. arch=sm_80 for A100, sm_90 for H100)")
    return str(arch)


def find_cross_compiler(cxx: str = ARM_CROSS_CXX) -> str:
    """Path of the AArch64 cross compiler.

    Raises:
        BackendError: not on PATH; says which Debian packages to install.
    """
    path = shutil.which(cxx)
    if path is None:
        raise BackendError(f"cross compiler {cxx!r} not found on PATH, needed to export an ARM (aarch64) "
                           f"library; install it with: {ARM_APT}")
    return path


def export_kwargs(family: str, target=None) -> dict:
    """Keyword arguments of ``export_library`` for a library of ``family``: the AArch64 cross
    compiler for ``arm`` and for CUDA with an aarch64 host (Jetson, :data:`BOARDS`;
    :func:`find_cross_compiler`), nothing (the host compiler) otherwise."""
    host = getattr(target, "host", None) if target is not None else None
    aarch64_host = host is not None and "aarch64" in str(host.attrs.get("mtriple", "") if "mtriple" in host.attrs else "")
    if family != "arm" and not aarch64_host:
        return {}
    from tvm.support import cc

    return {"fcompile": cc.cross_compiler(find_cross_compiler(ARM_CROSS_CXX))}


def target_spec(name: str = "cpu", **overrides: Any) -> dict:
    """The JSON dict of a named target with ``overrides`` applied (keys as TVM spells them,
    ``num_cores`` also accepted for ``num-cores``).

    - ``cpu``: ``{"kind": "llvm", "mcpu": <host>, "num-cores": <threads>}``
    - ``cuda``: ``{"kind": "cuda", "arch": "sm_80"}`` with an llvm host
    - ``arm``: ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "num-cores": 4}`` (NEON)

    Board presets (:data:`BOARDS`): ``rpi4``/``rpi5`` are ``arm`` with the board's ``mcpu``;
    ``jetson-*`` are ``cuda`` with the board's ``arch`` (and an aarch64 host, see :func:`resolve_target`).

    Raises:
        BackendError: unknown name or an invalid CUDA arch.
    """
    name = ALIASES.get(name, name)
    if name in BOARDS:
        base, preset, _ = BOARDS[name]
        return target_spec(base, **dict(preset, **overrides))
    overrides = {k.replace("_", "-") if k in ("num_cores",) else k: v for k, v in overrides.items() if v is not None}
    if name == "cpu":
        spec = {"kind": "llvm", "mcpu": host_mcpu(), "num-cores": default_threads()}
    elif name == "cuda":
        spec = {"kind": "cuda", "arch": DEFAULT_CUDA_ARCH}
    elif name == "arm":
        # num-cores: MetaSchedule needs it to tune; 4 = Raspberry Pi 4/5 (override for other boards)
        spec = {"kind": "llvm", "mtriple": ARM_TRIPLE, "mcpu": ARM_DEFAULT_MCPU, "num-cores": ARM_DEFAULT_CORES}
    else:
        raise BackendError(f"unknown target {name!r}; use one of {', '.join(TARGET_NAMES + tuple(BOARDS))} "
                           f"(with overrides such as arch=sm_90 or mcpu=cortex-a72)")
    spec.update(overrides)
    if spec.get("kind") == "cuda":
        check_cuda_arch(spec.get("arch", DEFAULT_CUDA_ARCH))
    return spec


def resolve_target(name: str = "cpu", **overrides: Any):
    """``tvm.target.Target`` for a named target (see :func:`target_spec`); CUDA gets an llvm host.

    Raises:
        BackendError: unknown name, invalid CUDA arch, or a spec TVM rejects (TVM's message quoted).
    """
    import tvm

    spec = target_spec(name, **overrides)
    board_host = BOARDS.get(name, (None, None, None))[2]
    try:
        if spec["kind"] == "cuda":
            host = ({"kind": "llvm", "mtriple": ARM_TRIPLE, "mcpu": board_host} if board_host
                    else {"kind": "llvm", "mcpu": host_mcpu()})
            return tvm.target.Target(spec, host=host)
        return tvm.target.Target(spec)
    except Exception as exc:  # TVM raises ValueError with a long message
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"TVM rejected target {spec}: {first}") from exc


def target_json(target) -> str:
    """Canonical JSON text of a target (with its host), used in cache keys and manifests."""
    import json

    d = dict(target.export())
    if target.host is not None and target.kind.name != "llvm":
        d["host"] = dict(target.host.export())
    return json.dumps(d, sort_keys=True, default=str)


def target_family(target) -> str:
    """``cpu``, ``cuda`` or ``arm`` for a resolved target."""
    if target.kind.name == "cuda":
        return "cuda"
    if "aarch64" in str(target.attrs.get("mtriple", "")):
        return "arm"
    return "cpu"
