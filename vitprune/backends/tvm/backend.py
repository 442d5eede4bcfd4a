"""Apache TVM (Relax) backend: torch.export -> Relax -> ``tvm.compile`` for cpu / cuda / arm.

Flow (TVM_NOTES.md §1): re-export the graph at the static example batch, check every ATen op has
an importer (else :class:`BackendError` naming the op and where it came from), import with
``from_exported_program`` (weights embedded as constants, so weight transposes are folded),
optionally apply fast-math (§2: ``fast_erf`` GELU, ``fast_softmax``/``fast_exp``; CPU default), then
build: CPU/ARM with the default pipeline or, when ``tune=True`` / a tuning database exists, with the
MetaSchedule schedules from the cache (:mod:`vitprune.backends.tvm.tuning`); CUDA with the default GPU
pipeline (dlight rules), which builds on a machine without a GPU (§4a). A tuned CPU build is stored
in the library cache and a later compile of the same graph (same code, weights, input shape, target
and database) loads it instead of exporting, importing and building (:mod:`vitprune.backends.tvm.libcache`).

``.export("m.so")`` writes the library plus ``m.so.json`` (manifest: target, input shape, passes),
and ``m.so.cu`` (generated CUDA source) for CUDA; each file is written to a temporary name and
renamed, so a failure leaves nothing half-written. :class:`LoadedTvm` reloads it with no model code.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import tempfile
import threading
import time
import warnings
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.fx import GraphModule

from ...errors import BackendError, error_line
from ...files import atomic_write, sha256_file
from ...ir.capture import export_program
from ..artefact import require_trust, sha256_bytes, verify_hashes
from .targets import export_kwargs, resolve_target, target_family, target_json
from . import libcache as lc
from .cuda_schedule import ScheduleLog
from .logs import quieted

MANIFEST_SUFFIX = ".json"
CUDA_SOURCE_SUFFIX = ".cu"


def _origin(node) -> str:
    """Where an ATen node came from: the vitprune pass / op module in its stack trace, and its module path."""
    parts = []
    trace = node.meta.get("stack_trace") or ""
    hits = re.findall(r"vitprune/(passes|ops)/(\w+)\.py", trace)
    if node.meta.get("vitprune_pass"):
        parts.append(f"emitted by pass {node.meta['vitprune_pass']!r}")
    elif hits:
        kind, mod = hits[-1]
        parts.append(f"emitted by vitprune/{kind}/{mod}.py")
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        parts.append(f"in module {list(stack.values())[-1][0]!r}")
    return ", ".join(parts) or "origin unknown"


def check_importable(ep) -> None:
    """Raise if the (decomposed) ExportedProgram has an op ``from_exported_program`` cannot import.

    Raises:
        BackendError: names each missing ATen op and the pass / module that emitted it.
    """
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    importer = ExportedProgramImporter()
    known = importer.create_convert_map()
    missing = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", str(node.target)) not in known:
            missing.setdefault(getattr(node.target, "__name__", str(node.target)), node)
    if missing:
        desc = "; ".join(f"aten op {name!r} ({_origin(n)})" for name, n in missing.items())
        raise BackendError(f"TVM's Relax importer cannot lower {desc}. Use a formulation it has (e.g. topk/argsort "
                           f"without stable=True + gather, TVM_NOTES.md §3) or use backend='onnx'/'torch'")


def import_relax(gm: GraphModule, example_inputs: tuple, keep_params_as_input: bool = False):
    """GraphModule -> Relax IRModule at the static batch of ``example_inputs`` (weights embedded).

    Raises:
        BackendError: torch.export fails at the static batch, or an op has no importer.
    """
    from tvm.relax.frontend.torch import from_exported_program

    try:
        ep = export_program(gm, example_inputs, dynamic_batch=False).run_decompositions()
    except Exception as exc:
        raise BackendError(f"torch.export of the graph failed before TVM import: {error_line(exc)}") from exc
    check_importable(ep)
    try:
        return from_exported_program(ep, keep_params_as_input=keep_params_as_input, run_ep_decomposition=False)
    except Exception as exc:
        raise BackendError(f"TVM's Relax importer failed: {type(exc).__name__}: {str(exc).strip()[:300]}") from exc


def _fast_gelu(bb, call):
    from tvm import topi

    def f(x):  # 0.5 x (1 + erf(x / sqrt 2)) with the polynomial fast_erf
        return topi.multiply(x, topi.add(topi.multiply(topi.fast_erf(topi.multiply(x, 0.7071067811865476)), 0.5), 0.5))

    return bb.call_te(f, call.args[0], primfunc_name_hint="gelu_fast")


def apply_fast_math(mod):
    """softmax -> fast_softmax, exp/erf/tanh -> fast_*, GELU via fast_erf (TVM_NOTES.md §2 "Fast-math").

    libm's ``erff``/``expf`` do not vectorize (measured: docs/decisions.md, "Fast math on CPU").
    """
    from tvm import relax

    mod = relax.transform.FastMathTransform()(mod)
    return relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.gelu": _fast_gelu})(mod)


def build(mod, target, tuning_dir: Optional[str] = None, schedule_log=None):
    """``tvm.compile`` for ``target``; with ``tuning_dir`` the MetaSchedule database's schedules are applied.
    CUDA builds use :func:`~vitprune.backends.tvm.cuda_schedule.cuda_pipeline` (a dlight rule that fails
    on a function hands it to the next rule; each such fallback is recorded in ``schedule_log`` and
    warned about).

    Raises:
        BackendError: the build fails (TVM's message, first line), or no dlight rule schedules a CUDA function.
    """
    import tvm

    from .cuda_schedule import cuda_pipeline
    from .tuning import apply_database

    log = schedule_log if schedule_log is not None else ScheduleLog()
    try:
        if tuning_dir is not None:
            mod = apply_database(mod, target, tuning_dir)
        if target_family(target) != "cuda":
            return tvm.compile(mod, target=target)
        ex = tvm.compile(mod, target=target, relax_pipeline=cuda_pipeline(target, log))
        if log.fallbacks:
            warnings.warn("CUDA build: a dlight rule failed on some functions; another rule scheduled them:\n"
                          + log.summary(), stacklevel=2)
        return ex
    except BackendError:
        raise
    except Exception as exc:
        where = (f" (no dlight rule could schedule {', '.join(fn for fn, _ in log.unscheduled)}: "
                 f"{'; '.join(f'{r}: {e}' for _, fails in log.unscheduled for r, e in fails)[:300]})"
                 if log.unscheduled else "")
        raise BackendError(f"TVM build for {target_family(target)} failed: {error_line(exc, last=True)}{where}") from exc


def cuda_source(ex) -> str:
    """The generated CUDA C of a CUDA executable (tree: VMExecutable -> llvm host -> cuda), or ''."""
    def walk(m):
        if m.kind == "cuda":
            return m.inspect_source("")
        for sub in m.imports:
            s = walk(sub)
            if s:
                return s
        return ""

    return walk(ex.mod)


def _host_can_run(family: str) -> Optional[str]:
    """None if this machine can run a library of ``family``, else the reason."""
    import tvm

    if family == "cuda" and not tvm.cuda(0).exist:
        return "it was built for CUDA and this machine has no CUDA GPU (load it on a machine with an NVIDIA GPU)"
    if family == "arm" and platform.machine().lower() not in ("aarch64", "arm64"):
        return (f"it was built for aarch64 and this machine is {platform.machine()} (copy it to an ARM64 device; "
                f"under x86 it can only be run with qemu-user)")
    return None


class _VmRunner:
    """Run a Relax VM on ``[B, 3, H, W]`` with a static batch: other batch sizes are split / zero-padded
    into chunks of the compiled batch (images are independent in a ViT). Safe to call from several
    threads: calls take turns on the one VM (its allocator is not thread-safe)."""

    vm: Any
    device: Any
    input_shape: tuple
    _lock: threading.Lock

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        import tvm

        if self.vm is None:
            raise BackendError(f"cannot run this TVM module here: {self._why_not}; build with target='cpu' to run "
                               f"it locally, or pass check_parity=False to compile() to only build it")
        shape = tuple(self.input_shape)
        if tuple(x.shape[1:]) != shape[1:]:
            raise BackendError(f"TVM module was built for images {shape[1:]}, got input {tuple(x.shape)}")
        b = shape[0]
        arr = x.detach().cpu().float().numpy()
        n = arr.shape[0]
        pad = (-n) % b
        if pad:
            arr = np.concatenate([arr, np.zeros((pad,) + arr.shape[1:], np.float32)])
        outs = []
        for i in range(0, arr.shape[0], b):
            inp = tvm.runtime.tensor(np.ascontiguousarray(arr[i:i + b]), self.device)
            if getattr(self, "session", None) is not None:  # over RPC a returned tuple stays remote
                self.vm.set_input("main", inp)
                self.vm.invoke_stateful("main")
                out = self.vm.get_outputs("main")
            else:
                out = self.vm["main"](inp)
            if not hasattr(out, "numpy"):
                out = out[0]
            outs.append(out.numpy())
        return torch.from_numpy(np.concatenate(outs)[:n])


def _make_vm(lib, family: str):
    import tvm
    from tvm import relax

    dev = tvm.cuda(0) if family == "cuda" else tvm.cpu(0)
    return relax.VirtualMachine(lib, dev), dev


class TvmModule(_VmRunner):
    """A graph built by TVM for one target at a static input shape.

    Attributes:
        executable: the ``relax.VMExecutable`` (or the loaded library when it came from the library
        cache); target: the ``tvm.target.Target``; family: cpu/cuda/arm; tuning: the
        :class:`~vitprune.backends.tvm.tuning.TuneResult` when tuned; cuda_source: CUDA C (cuda only);
        library_path: the cached library it was loaded from (:mod:`vitprune.backends.tvm.libcache`), or None.
    """

    def __init__(self, executable, target, input_shape: tuple, fast_math: bool, tuning=None,
                 library_path: Optional[str] = None, device=None):
        self.executable = executable
        self.library_path = library_path
        self.target = target
        self.family = target_family(target)
        self.input_shape = tuple(input_shape)
        self.fast_math = fast_math
        self.tuning = tuning
        self.schedule_fallbacks: list = []  # CUDA: (function, failed dlight rule, error, rule used)
        self.cuda_source = cuda_source(executable) if self.family == "cuda" else ""
        self.remote = device if device is not None and device.is_remote else None
        self.session = None
        if self.remote is not None:  # runs on the device over RPC (vitprune.devices)
            from .remote import remote_vm

            self._why_not = None
            self.vm, self.device, self.session = remote_vm(self.remote, target, executable, library_path)
        else:
            self._why_not = _host_can_run(self.family)
            self.vm, self.device = (None, None) if self._why_not else _make_vm(executable, self.family)
        self._lock = threading.Lock()

    def benchmark(self, repeat: int = 5, number: int = 1) -> dict:
        """Latency on the device it runs on (TVM ``time_evaluator``; :func:`~vitprune.backends.tvm.remote.time_vm`).

        Raises:
            BackendError: the module cannot run here (see ``__call__``).
        """
        from .remote import time_vm

        if self.vm is None:
            raise BackendError(f"cannot time this TVM module here: {self._why_not}")
        return time_vm(self.vm, self.device, self.input_shape, repeat=repeat, number=number)

    @quieted
    def export(self, path: str, manifest: Optional[dict] = None) -> str:
        """Write ``path`` (shared library, weights embedded), ``path.json`` (manifest) and, for CUDA,
        ``path.cu`` (generated CUDA source). ARM uses the ``aarch64-linux-gnu-g++`` cross compiler.

        Raises:
            BackendError: the cross compiler is missing (says which package to install) or linking fails.
        """
        kwargs = export_kwargs(self.family, self.target)
        man = dict(manifest or {"format": "vitprune"}, backend="tvm", target=json.loads(target_json(self.target)), target_family=self.family,
                   input_shape=list(self.input_shape), fast_math=self.fast_math,
                   tuned=bool(self.tuning), tuning_dir=getattr(self.tuning, "work_dir", None),
                   schedule_fallbacks=[list(f) for f in self.schedule_fallbacks])
        parts = [path] + ([path + CUDA_SOURCE_SUFFIX] if self.family == "cuda" else [])
        with contextlib.ExitStack() as stack:  # every file to a temporary, renamed when all are written
            tmps = [stack.enter_context(atomic_write(p, "artefact")) for p in [path + MANIFEST_SUFFIX, *parts]]
            try:
                if self.library_path is not None:
                    lc.copy_library(self.library_path, tmps[1])
                else:
                    self.executable.export_library(tmps[1], **kwargs)
            except Exception as exc:
                why = error_line(exc, last=True).replace(tmps[1], path)  # name the user's path, not the temporary
                raise BackendError(f"export_library({path}) failed: {why}") from exc
            if self.family == "cuda":
                with open(tmps[2], "w") as f:
                    f.write(self.cuda_source)
            man["files"] = {os.path.basename(p): sha256_file(t) for p, t in zip(parts, tmps[1:])}
            with open(tmps[0], "w") as f:
                f.write(json.dumps(man, indent=1, default=str))
        return path


class LoadedTvm(_VmRunner):
    """A ``.so`` written by :meth:`TvmModule.export`, loaded with no model code (needs ``path.json``).

    Args:
        trust: a ``.so`` is native code (docs/security.md); without ``trust=True`` it is refused.

    Raises:
        UntrustedArtefactError: ``trust`` is False, or the library differs from the SHA-256 its manifest records.
        BackendError: no manifest next to it (foreign file), a corrupt library, or a library this
            machine cannot run (CUDA without a GPU, aarch64 on x86), saying which.
    """

    @quieted
    def __init__(self, path: str, trust: bool = False):
        import tvm

        require_trust(path, trust)
        man_path = path + MANIFEST_SUFFIX
        try:
            with open(man_path) as f:
                self.manifest = json.load(f)
            if self.manifest.get("format") != "vitprune" and self.manifest.get("backend") != "tvm":
                raise ValueError("not a vitprune manifest")
        except (OSError, ValueError) as exc:
            raise BackendError(f"{path} has no valid vitprune manifest {man_path} ({type(exc).__name__}); it was not "
                               f"written by vitprune's TVM export: re-export it with `vitprune export --backend tvm`") from exc
        self.family = self.manifest.get("target_family", "cpu")
        self.input_shape = tuple(self.manifest["input_shape"])
        self._why_not = _host_can_run(self.family)
        if self._why_not:
            raise BackendError(f"cannot load {path}: {self._why_not}")
        with open(path, "rb") as f:
            data = f.read()
        cuda = path + CUDA_SOURCE_SUFFIX
        actual = {os.path.basename(path): sha256_bytes(data)}
        if os.path.exists(cuda):
            actual[os.path.basename(cuda)] = sha256_file(cuda)
        verify_hashes(path, self.manifest.get("files"), actual)
        with tempfile.TemporaryDirectory(prefix="vitprune-load-") as private:  # load the bytes that were checked
            copy = os.path.join(private, os.path.basename(path))
            with open(copy, "wb") as f:
                f.write(data)
            try:
                lib = tvm.runtime.load_module(copy)
                self.vm, self.device = _make_vm(lib, self.family)
            except Exception as exc:
                raise BackendError(f"{path} is not a loadable TVM library (corrupt or foreign): "
                                   f"{error_line(exc, last=True)}") from exc
        self._lock = threading.Lock()


class TvmBackend:
    """``backend="tvm"``. Options:

    - ``target``: ``"cpu"`` (default), ``"cuda"``, ``"arm"``, or a TVM target JSON dict;
    - ``target_options``: dict of overrides (``{"arch": "sm_90"}``, ``{"mcpu": "cortex-a72"}``); ``arch=`` and
      ``mcpu=`` are also accepted directly;
    - ``fast_math``: default True on CPU/ARM, False on CUDA;
    - ``device``: a :class:`vitprune.devices.Device`; a remote one runs the module (and the parity check) on the
      device over TVM RPC, and tuning measures there (so ``tune`` works for ``arm`` too);
    - ``tune``: MetaSchedule-tune (CPU, or the target of a remote ``device``; from the cache when already tuned); ``trials``: mean per tuned task
      (default :data:`~vitprune.backends.tvm.tuning.DEFAULT_TRIALS_PER_TASK`); ``use_cache``: compile with a
      cached database when one exists even if ``tune=False`` (default True); ``cache_dir``; ``progress``;
      ``tune_ops``: tune only tasks whose name contains one of these (e.g. ``["matmul"]``).
    """

    name = "tvm"

    @quieted
    def lower(self, gm: GraphModule, example_inputs: tuple, target: Union[str, dict] = "cpu",
              target_options: Optional[dict] = None, arch: Optional[str] = None, mcpu: Optional[str] = None,
              fast_math: Optional[bool] = None, tune: bool = False, trials: Optional[int] = None,
              use_cache: bool = True, cache_dir: Optional[str] = None, progress: bool = True,
              tune_ops: Optional[list] = None, device=None, **options: Any) -> TvmModule:
        if options:
            raise BackendError(f"tvm backend: unknown option(s) {sorted(options)}; valid: target, target_options, arch, "
                               f"mcpu, fast_math, tune, trials, tune_ops, use_cache, cache_dir, progress, device")
        tgt = self.resolve(target, target_options, arch=arch, mcpu=mcpu)
        family = target_family(tgt)
        if fast_math is None:
            fast_math = family != "cuda"
        remote = device is not None and device.is_remote
        cached = (family == "cpu" or (remote and family == "arm")) and (tune or use_cache)
        if tune and not cached:
            raise BackendError(f"tune=True needs target='cpu' (MetaSchedule measures on this machine), or a remote "
                               f"device to measure on (--tracker HOST:PORT --device-key K, "
                               f"device=vitprune.devices.remote(...)); got {family!r}")
        fingerprint = lc.graph_fingerprint(gm, example_inputs) if cached else None
        if cached:
            hit = self._cached_library(fingerprint, example_inputs, tgt, fast_math, cache_dir, tune_ops, device)
            if hit is not None:
                return hit
        mod = import_relax(gm, example_inputs)
        if fast_math:
            mod = apply_fast_math(mod)
        tuning = None
        if cached:
            from . import tuning as tn

            if tune:
                tuning = tn.tune(mod, tgt, trials_per_task=trials or tn.DEFAULT_TRIALS_PER_TASK,
                                 cache_dir=cache_dir, progress=progress, op_names=tune_ops, device=device)
            else:
                tuning = tn.lookup(mod, tgt, cache_dir=cache_dir, op_names=tune_ops)
        log = ScheduleLog()
        ex = build(mod, tgt, tuning.work_dir if tuning else None, schedule_log=log)
        if tuning is not None:
            lc.store(ex, tuning.work_dir, lc.library_key(fingerprint, tgt, tuning.work_dir, fast_math, tune_ops),
                     **export_kwargs(family, tgt))
        module = TvmModule(ex, tgt, tuple(example_inputs[0].shape), fast_math, tuning, device=device)
        module.schedule_fallbacks = list(log.fallbacks)
        return module

    @staticmethod
    def _cached_library(fingerprint, example_inputs, tgt, fast_math, cache_dir, tune_ops,
                        device=None) -> Optional[TvmModule]:
        """The tuned library of the graph with this :func:`~vitprune.backends.tvm.libcache.graph_fingerprint`
        from the library cache, or None (build it)."""
        import tvm

        from .tuning import TuneResult, database_dir, read_meta

        t0 = time.time()
        work_dir = database_dir(tgt, cache_dir)
        if read_meta(work_dir).get("tvm_version") != tvm.__version__:
            return None
        key = lc.library_key(fingerprint, tgt, work_dir, fast_math, tune_ops)
        path = lc.find(work_dir, key)
        if path is None:
            return None
        lib = None
        if _host_can_run(target_family(tgt)) is None:  # else it is uploaded to the device as it is
            try:
                lib = tvm.runtime.load_module(path)
            except Exception:  # a corrupt cache entry: rebuild (and overwrite it)
                return None
        tuning = TuneResult(work_dir, True, 0, 0, time.time() - t0)
        return TvmModule(lib, tgt, tuple(example_inputs[0].shape), fast_math, tuning, library_path=path,
                         device=device)

    @staticmethod
    def resolve(target: Union[str, dict], target_options: Optional[dict] = None, **extra):
        """Target name or JSON dict (+ overrides) -> ``tvm.target.Target``; BackendError if invalid."""
        import tvm

        overrides = dict(target_options or {}, **{k: v for k, v in extra.items() if v is not None})
        if isinstance(target, dict):
            try:
                return tvm.target.Target(dict(target, **overrides))
            except Exception as exc:
                raise BackendError(f"TVM rejected target {target}: {error_line(exc)}") from exc
        return resolve_target(target, **overrides)
