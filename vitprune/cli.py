"""The ``vitprune`` command line.

    vitprune info --model NAME
    vitprune eval --model NAME [--weights FILE.safetensors] --data DIR [--pass SPEC]...
                  [--backend B] [--batch-size N] [--threads T] [--limit N] [--json OUT]
    vitprune viz --model NAME [--weights FILE] --image IMG --pass SPEC [--pass SPEC]... --out PNG
    vitprune search --model NAME [--weights FILE] --data DIR --target-gmacs G [--trials N]
                    [--images N] [--seed S] --out BEST.json
    vitprune export --model NAME [--weights FILE] [--pass SPEC]... --backend onnx|tvm|torch
                  [--target cpu|cuda|arm] [--arch sm_80] [--tune [--trials N]] --out PATH
    vitprune tune --model NAME [--weights FILE] [--pass SPEC]... [--trials N] [--threads T]
                  [--target cpu|arm|rpi4|rpi5] [--tracker HOST:PORT --device-key K] [--out PATH.so]
    vitprune bench --model NAME [--pass SPEC]... [--target T] [--batch-sizes 1,8] [--tracker ... --device-key ...]
    vitprune device serve --tracker HOST:PORT --key K | device list --tracker HOST:PORT | device tracker

``--tracker HOST:PORT --device-key K`` (tune, eval, export, bench) runs on the devices registered with
TVM's RPC tracker under that key (docs/devices.md).

``SPEC`` is ``name[:key=value[,key=value]]``; repeated ``--pass`` options run in order.
Errors print one line ``vitprune: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

import torch

COMMANDS: dict[str, tuple[Callable, Callable]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: ``configure(parser)`` adds its options, the function runs it."""

    def deco(fn):
        COMMANDS[name] = (configure, fn)
        return fn

    return deco


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="timm model name, e.g. deit_tiny_patch16_224")
    p.add_argument("--weights", help="safetensors state dict for the model (default: random weights)")


def add_pass_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC",
                   help="pass spec name[:key=value,...]; repeat to run several in order")


def _info_args(p):
    add_model_args(p)
    add_pass_args(p)


@command("info", _info_args)
def cmd_info(args) -> int:
    """List the attention sites found in the model (after the given passes)."""
    from . import compile as vp_compile
    from .ir import find_attention_sites
    from .models import load_model

    model = load_model(args.model, args.weights)
    compiled = vp_compile(model, passes=args.passes, progress=False)
    sites = find_attention_sites(compiled.graph_module)
    print(f"{args.model}: {len(sites)} attention sites, {compiled.report.gmacs_after:.3f} GMACs")
    cols = ["block", "path", "qkv", "kind", "heads", "head_dim", "tokens", "prefix_tokens", "embed_dim", "mlp_hidden"]
    rows = [s.summary() for s in sites]
    print(format_table(cols, [[r[c] for c in cols] for r in rows]))
    return 0


def _eval_args(p):
    add_model_args(p)
    p.add_argument("--data", required=True, help="folder of <synset>_*.JPEG images with synsets.txt")
    add_pass_args(p)
    p.add_argument("--backend", default="torch", help="torch (default), onnx or tvm")
    p.add_argument("--target", help="backend target (tvm: cpu, cuda, arm)")
    p.add_argument("--batch-size", type=int, default=50, help="evaluation and throughput batch size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--crop-pct", type=float, help="eval center-crop ratio (default: the paper's, DeiT 0.875)")
    p.add_argument("--calib", help="calibration image folder for passes that need data")
    p.add_argument("--calib-images", type=int, default=64, help="calibration images to use")
    p.add_argument("--json", help="write the numbers as JSON to this file")
    p.add_argument("--no-progress", action="store_true")
    add_device_args(p)


@command("eval", _eval_args)
def cmd_eval(args) -> int:
    """Top-1, agreement with the unpruned model, GMACs and throughput on a folder of real images."""
    from . import compile as vp_compile
    from .eval import ImageFolder, evaluate, make_loader, throughput
    from .data import load_images
    from .models import eval_transform, load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.weights)
    transform = eval_transform(model, args.crop_pct)
    dataset = ImageFolder(args.data, transform, limit=args.limit)
    calibration = load_images(args.calib, transform, args.calib_images) if args.calib else None
    options = _backend_options(args)
    compiled = vp_compile(model, passes=args.passes, backend=args.backend, calibration=calibration,
                          progress=not args.no_progress, **options)
    reference = model if args.passes or args.backend != "torch" else None
    remote = options.get("device")
    fn = EagerComparison(compiled) if remote is not None else compiled
    res = evaluate(fn, make_loader(dataset, args.batch_size), reference=reference, progress=not args.no_progress)
    if reference is None:  # identity pipeline on torch: the reference is the model itself
        res["top1_agreement"], res["top1_reference"] = 100.0, res["top1"]
    if remote is not None:
        img_s = _device_throughput(compiled, fn, remote)
    else:
        img_s = throughput(compiled, batch_size=args.batch_size, threads=args.threads, repeats=3)
    out = {
        "model": args.model, "passes": args.passes, "backend": args.backend,
        "top1": res["top1"], "top1_agreement": res["top1_agreement"], "top1_reference": res["top1_reference"],
        "correct": res["correct"], "images": res["images"], "skipped": res["skipped"],
        "gmacs": compiled.report.gmacs_after, "gmacs_base": compiled.report.gmacs_before,
        "throughput_img_s": img_s, "batch_size": args.batch_size, "threads": args.threads,
        "report": compiled.report.to_dict(),
    }
    if remote is not None:
        out.update(device=str(remote), **fn.summary())
    cols = ["model", "passes", "backend", "top-1 %", "agreement %", "GMACs", "img/s"]
    print(format_table(cols, [[args.model, " ".join(args.passes) or "-", args.backend,
                               f"{out['top1']:.1f} ({out['correct']}/{out['images']})",
                               f"{out['top1_agreement']:.1f}", f"{out['gmacs']:.3f}", f"{img_s:.1f}"]]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


class EagerComparison:
    """Runs a compiled module and, on the same images, its eager pruned graph: how far the backend
    (on a remote device) is from eager PyTorch (top-1 agreement, max abs logit difference)."""

    def __init__(self, compiled):
        self.compiled, self.same, self.images, self.max_abs_diff = compiled, 0, 0, 0.0

    def __call__(self, x):
        out = self.compiled(x)
        with torch.no_grad():
            ref = self.compiled.graph_module(x)
        self.same += int((out.argmax(-1) == ref.argmax(-1)).sum())
        self.images += len(x)
        self.max_abs_diff = max(self.max_abs_diff, float((out - ref).abs().max()))
        return out

    def summary(self) -> dict:
        return {"top1_same_as_eager": self.same, "images_vs_eager": self.images,
                "max_abs_logit_diff_vs_eager": self.max_abs_diff}


def _device_throughput(compiled, cmp: EagerComparison, device) -> float:
    """img/s on the remote device (TVM time_evaluator at the compiled batch), printing the eager check."""
    from .devices import device_info, is_emulated

    lowered = compiled.lowered
    t = lowered.benchmark(repeat=3)
    print(f"on {device}: top-1 same as eager PyTorch on {cmp.same}/{cmp.images} images, max abs logit difference "
          f"{cmp.max_abs_diff:.2e}; latency {t['median_ms']:.1f} ms at batch {lowered.input_shape[0]} (median of 3)")
    if is_emulated(device_info(lowered.session), device.key):
        print("note: emulated device (qemu-user): its timings mean nothing for speed")
    return 1000.0 * lowered.input_shape[0] / t["median_ms"]


def _viz_args(p):
    add_model_args(p)
    p.add_argument("--image", required=True, help="image file to draw the kept-token map of")
    add_pass_args(p)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--json", help="also write the per-layer token groups as JSON")


@command("viz", _viz_args)
def cmd_viz(args) -> int:
    """Draw which patches each pruning / merging layer keeps for one image (PNG)."""
    from .eval.viz import kept_token_map
    from .models import load_model

    if not args.passes:
        raise ValueError("viz needs at least one token pass, e.g. --pass zero-tprune:target_gmacs=0.96")
    model = load_model(args.model, args.weights)
    res = kept_token_map(model, args.image, args.passes, args.out)
    if not res["layers"]:
        raise ValueError(f"the passes {args.passes} prune or merge no tokens; nothing to draw")
    print(f"wrote {res['out']}: {len(res['layers'])} layers, {res['gmacs']:.3f} GMACs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f)
    return 0


def _search_args(p):
    add_model_args(p)
    p.add_argument("--data", required=True, help="calibration folder of <synset>_*.JPEG images with synsets.txt")
    p.add_argument("--target-gmacs", type=float, required=True, help="GMACs budget per image")
    p.add_argument("--trials", type=int, default=20, help="random schedules to try")
    p.add_argument("--images", type=int, default=100, help="calibration images (the first N of the folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--out", required=True, help="JSON file for the best zero-tprune config")
    p.add_argument("--no-progress", action="store_true")


@command("search", _search_args)
def cmd_search(args) -> int:
    """Monte Carlo search of a Zero-TPrune schedule for a GMACs budget on calibration images."""
    from .models import load_model
    from .search import search_schedule

    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.weights)
    best = search_schedule(model, args.data, args.target_gmacs, trials=args.trials, images=args.images,
                           seed=args.seed, progress=not args.no_progress)
    with open(args.out, "w") as f:
        json.dump(best, f, indent=2)
    print(f"best of {args.trials}: agreement {best['agreement']:.1f} % on {best['images']} images, "
          f"{best['gmacs']:.3f} GMACs -> {args.out}")
    return 0


def _backend_options(args) -> dict:
    """Backend keyword options from --target/--arch/--threads/--tune/--trials."""
    opts = {}
    if args.backend == "tvm":
        opts["target"] = args.target or "cpu"
        device = device_from_args(args)
        if device is not None:
            opts["device"] = device
        if getattr(args, "arch", None):
            opts["arch"] = args.arch
        if getattr(args, "tune", False):
            opts.update(tune=True, trials=args.trials)
    elif args.backend == "onnx":
        opts["threads"] = args.threads
    elif args.target or getattr(args, "tracker", None):
        from .errors import BackendError

        raise BackendError(f"--target/--tracker apply to --backend tvm only, got --backend {args.backend}")
    return opts


def _export_args(p):
    add_model_args(p)
    add_pass_args(p)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "tvm"])
    p.add_argument("--target", help="tvm target: cpu (default), cuda, arm")
    p.add_argument("--arch", help="CUDA arch for --target cuda, e.g. sm_80")
    p.add_argument("--tune", action="store_true", help="tvm cpu: MetaSchedule-tune first (cached)")
    p.add_argument("--trials", type=int, default=None,
                   help="tvm: mean MetaSchedule trials per tuned task (budget = N x tasks worth tuning)")
    p.add_argument("--batch-size", type=int, default=1, help="example batch (TVM builds for this batch)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--calib", help="calibration image folder for passes that need data")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--out", required=True, help="artefact path: .pt2 (torch), .onnx, .so (tvm)")
    add_device_args(p)


def _compile_from_args(args, check_parity=True):
    import os

    from . import compile as vp_compile
    from .models import eval_transform, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    model = load_model(args.model, args.weights)
    calibration = None
    if getattr(args, "calib", None):
        from .data import load_images

        calibration = load_images(args.calib, eval_transform(model), args.calib_images)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    x = torch.randn(args.batch_size, c, h, w)
    parity = check_parity and not (args.backend == "tvm" and (args.target or "cpu") != "cpu"
                                   and not getattr(args, "tracker", None))  # remote: checked on the device
    return vp_compile(model, passes=args.passes, backend=args.backend, example_inputs=x, calibration=calibration,
                      check_parity=parity, **_backend_options(args))


@command("export", _export_args)
def cmd_export(args) -> int:
    """Compile a model with passes for a backend/target and write a reloadable artefact."""
    compiled = _compile_from_args(args)
    path = compiled.export(args.out)
    extra = [p for p in (path + ".json", path + ".cu") if args.backend == "tvm" and __import__("os").path.exists(p)]
    print(f"wrote {path}" + (f" (+ {', '.join(extra)})" if extra else ""))
    print(compiled.report)
    return 0


def _tune_args(p):
    add_model_args(p)
    add_pass_args(p)
    p.add_argument("--trials", type=int, default=None,
                   help="mean MetaSchedule trials per tuned task (default: the package's); "
                        "tasks the target's database already has cost nothing")
    p.add_argument("--batch-size", type=int, default=1, help="batch size to tune for")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads (TVM num-cores)")
    p.add_argument("--target", default="cpu", help="cpu (this machine), or arm with --tracker (tune on the board)")
    p.add_argument("--out", help="also export the tuned library here (.so, for the device it was tuned on)")
    add_device_args(p)


@command("tune", _tune_args)
def cmd_tune(args) -> int:
    """MetaSchedule-tune a (pruned) model for this CPU or a remote device; cached under $VITPRUNE_CACHE (second run is free)."""
    args.backend, args.tune = "tvm", True
    compiled = _compile_from_args(args)
    _report_device_tuning(args, compiled)
    tr = compiled.lowered.tuning
    lib = getattr(compiled.lowered, "library_path", None)
    what = "cache hit" if tr.cache_hit else f"tuned {tr.num_tasks} tasks, {tr.trials} trials"
    print(f"{what} in {tr.seconds:.1f} s; database: {tr.work_dir}"
          + (f"; built library loaded from the cache: {lib}" if lib else ""))
    if args.out:
        print(f"wrote {compiled.export(args.out)}")
    return 0


def _report_device_tuning(args, compiled) -> None:
    """Say where the tuning measured, and that an emulated device's timings say nothing about speed."""
    dev = getattr(compiled.lowered, "remote", None)
    if dev is None:
        return
    from .devices import device_info, is_emulated

    info = device_info(compiled.lowered.session)
    print(f"measured on {dev} ({info.get('triple') or 'unknown CPU'}, cpu {info.get('cpu') or '?'})")
    if is_emulated(info, dev.key):
        print("note: this device is emulated (qemu-user): its timings mean nothing for speed; the schedules "
              "are only a check that remote tuning works. Tune on the real board for speed")


def _bench_args(p):
    add_model_args(p)
    add_pass_args(p)
    p.add_argument("--target", default="cpu", help="tvm target: cpu, arm (with --tracker), cuda (on a GPU machine)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes to time (default 1,8)")
    p.add_argument("--repeat", type=int, default=5, help="time_evaluator repeats (the median is reported)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (local cpu)")
    p.add_argument("--calib", help="calibration image folder for passes that need data")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--json", help="write the rows as JSON to this file")
    add_device_args(p)


@command("bench", _bench_args)
def cmd_bench(args) -> int:
    """Time the TVM library on the device (time_evaluator, median of repeats): untuned vs tuned (cached), per batch size."""
    import os

    from . import compile as vp_compile
    from .backends.tvm.backend import TvmBackend
    from .models import eval_transform, load_model

    args.backend = "tvm"
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    device = device_from_args(args)
    model = load_model(args.model, args.weights)
    calibration = None
    if args.calib:
        from .data import load_images

        calibration = load_images(args.calib, eval_transform(model), args.calib_images)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    gm = vp_compile(model, passes=args.passes, example_inputs=torch.randn(1, c, h, w), calibration=calibration,
                    progress=False).graph_module
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must be integers separated by commas, got {args.batch_sizes!r}") from None
    rows, out = [], []
    for b in batches:
        x = (torch.randn(b, c, h, w),)
        times = {}
        for label, use_cache in (("untuned", False), ("tuned", True)):
            mod = TvmBackend().lower(gm, x, target=args.target, device=device, use_cache=use_cache, progress=False)
            if label == "tuned" and not mod.tuning:
                times[label] = None
                continue
            times[label] = mod.benchmark(repeat=args.repeat)["median_ms"]
        tuned = times["tuned"]
        rows.append([b, f"{times['untuned']:.2f}", f"{tuned:.2f}" if tuned else "not tuned (run vitprune tune)",
                     f"{times['untuned'] / tuned:.2f}x" if tuned else "-"])
        out.append({"batch": b, "untuned_ms": times["untuned"], "tuned_ms": tuned})
    where = str(device) if device is not None else "this machine"
    print(f"{args.model} {' '.join(args.passes) or '(no passes)'} on {where}, target {args.target}: "
          f"latency, median of {args.repeat} (TVM time_evaluator)")
    print(format_table(["batch", "untuned ms", "tuned ms", "tuned speed-up"], rows))
    if device is not None:
        from .devices import is_emulated

        if is_emulated({}, device.key):
            print("note: emulated device (qemu-user): its timings mean nothing for speed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--tracker HOST:PORT --device-key K [--device-timeout S]``: run / tune on a remote device (docs/devices.md)."""
    p.add_argument("--tracker", help="TVM RPC tracker HOST:PORT of the device to run/tune on (tvm backend)")
    p.add_argument("--device-key", help="device key registered with the tracker (vitprune device serve --key)")
    p.add_argument("--device-timeout", type=float, default=60.0,
                   help="seconds to wait for a free device, and per measurement session")


def device_from_args(args):
    """The :class:`vitprune.devices.Device` named by ``--tracker``/``--device-key``, or None."""
    from .errors import BackendError

    tracker, key = getattr(args, "tracker", None), getattr(args, "device_key", None)
    if not tracker and not key:
        return None
    if not tracker or not key:
        raise BackendError("--tracker HOST:PORT and --device-key K go together (the tracker and the key its "
                           "devices registered with)")
    if getattr(args, "backend", "tvm") != "tvm":
        raise BackendError(f"--tracker applies to --backend tvm only, got --backend {args.backend}")
    from . import devices

    return devices.remote(tracker, key, timeout=args.device_timeout,
                          session_timeout=max(args.device_timeout, 60.0))


def _device_args(p):
    sub = p.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="run TVM's RPC server for this machine, registered with a tracker")
    serve.add_argument("--tracker", help="tracker HOST:PORT to register with")
    serve.add_argument("--key", required=True, help="device key, e.g. rpi4, rpi5, jetson-orin")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; a board "
                                                            "serving a tracker elsewhere listens on its LAN address)")
    serve.add_argument("--port", type=int, default=9090, help="first port to try")
    lst = sub.add_parser("list", help="devices registered with a tracker (keys, total, free, pending)")
    lst.add_argument("--tracker", required=True, help="tracker HOST:PORT")
    trk = sub.add_parser("tracker", help="run TVM's RPC tracker in the foreground")
    trk.add_argument("--host", default="127.0.0.1")
    trk.add_argument("--port", type=int, default=9190)


@command("device", _device_args)
def cmd_device(args) -> int:
    """Devices over TVM RPC: `serve` this machine, `list` a tracker's devices, run a `tracker`."""
    from . import devices

    if args.action == "serve":
        devices.serve(args.tracker, args.key, host=args.host, port=args.port)
    elif args.action == "list":
        rows = devices.tracker_summary(args.tracker)
        print(format_table(["key", "total", "free", "pending", "servers"],
                           [[r["key"], r["total"], r["free"], r["pending"], " ".join(r["servers"])] for r in rows])
              if rows else f"no devices registered with the tracker at {args.tracker}")
    else:
        tr = devices.start_tracker(args.host, args.port, args.port + 1)
        print(f"RPC tracker on {args.host}:{tr.port}; Ctrl-C stops it", flush=True)
        devices.run_until_stopped(tr)
    return 0


def format_table(cols: list, rows: list) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitprune", description="Make pre-trained ViTs faster without fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
        configure(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``vitprune`` command; returns the exit status."""
    from .errors import VitpruneError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (VitpruneError, FileNotFoundError, ValueError) as exc:
        print(f"vitprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
