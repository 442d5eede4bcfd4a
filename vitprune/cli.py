"""The ``vitprune`` command line.

    vitprune info --model NAME
    vitprune eval --model NAME [--weights FILE.safetensors] --data DIR [--pass SPEC]...
                  [--backend B] [--batch-size N] [--threads T] [--limit N] [--json OUT]
    vitprune viz --model NAME [--weights FILE] --image IMG --pass SPEC [--pass SPEC]... --out PNG
    vitprune search --model NAME [--weights FILE] --data DIR --target-gmacs G [--trials N]
                    [--images N] [--seed S] --out BEST.json
    vitprune sweep --model NAME [--weights FILE] --data DIR [--calib DIR | --calib-images N]
                   --backend torch|onnx|tvm [--target T] [--tracker HOST:PORT --device-key K]
                   [--batch-size B] [--methods M,...] [--trials N] [--storage URL] [--worker]
                   [--pick RULE] [--limit N] --out DIR
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

from .pipeline import describe

COMMANDS: dict[str, tuple[Callable, Callable]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: ``configure(parser)`` adds its options, the function runs it."""

    def deco(fn):
        COMMANDS[name] = (configure, fn)
        return fn

    return deco


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="timm model name, e.g. deit_tiny_patch16_224")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", help="safetensors state dict for the model (default: random weights)")
    w.add_argument("--pretrained", action="store_true",
                   help="timm's pretrained weights from the Hugging Face hub (needs the network)")


def model_from_args(args, uses_accuracy: bool = True):
    """The model named by --model with --weights / --pretrained; warns that accuracy is meaningless when
    neither is given and the command evaluates or exports (``uses_accuracy``)."""
    import warnings

    from .models import load_model

    model = load_model(args.model, args.weights, pretrained=getattr(args, "pretrained", False))
    if uses_accuracy and model.vitprune_weights == "random":
        warnings.warn("random weights: accuracy is meaningless (give --weights FILE.safetensors or --pretrained)")
    return model


def add_pass_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC",
                   help="pass spec name[:key=value,...], a named pipeline (e.g. deit-s-fast) or a .json config; "
                        "repeat to run several in order")
    p.add_argument("--config", dest="passes", action="append", metavar="FILE.json",
                   help="a pass-list config (written by search, sweep or export); runs in order with --pass")


def resolve_cli_passes(args) -> list:
    """``args.passes`` (spec strings, pipeline names, config paths) as configured passes, before any model
    is loaded; a config file made for another model than ``--model`` is refused."""
    from .pipeline import load_config, resolve_passes

    out = []
    for item in args.passes:
        if isinstance(item, str) and item.strip().endswith(".json"):
            out.extend(load_config(item.strip(), model=getattr(args, "model", None)))
        else:
            out.extend(resolve_passes(item))
    return out


def _info_args(p):
    add_model_args(p)
    add_pass_args(p)


@command("info", _info_args)
def cmd_info(args) -> int:
    """List the attention sites found in the model (after the given passes)."""
    from . import compile as vp_compile
    from .ir import find_attention_sites

    model = model_from_args(args, uses_accuracy=False)
    compiled = vp_compile(model, passes=args.passes, progress=False)
    sites = find_attention_sites(compiled.graph_module)
    print(f"{args.model}: {len(sites)} attention sites, {compiled.report.gmacs_after:.3f} GMACs")
    cols = ["block", "path", "qkv", "kind", "heads", "head_dim", "tokens", "prefix_tokens", "embed_dim", "mlp_hidden"]
    rows = [s.summary() for s in sites]
    print(format_table(cols, [[r[c] for c in cols] for r in rows]))
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", metavar="DIR",
                   help="calibration image folder for passes that calibrate (snp, head-prune); when it is the --data "
                        "folder, its first --calib-images images are held out from evaluation")
    p.add_argument("--calib-images", type=positive_int, default=64, metavar="N", help="calibration images to use")


def calibration_from_args(args, transform, data: Optional[str] = None):
    """(calibration tensor or None, the image paths used) from --calib/--calib-images for the passes in
    --pass; says how many images calibrate and how many are evaluated when --calib is the --data folder.

    Raises:
        DataError: a pass calibrates and neither --calib nor its calib= option gives images; --calib has no
            readable image.
    """
    import os
    import warnings

    from .data import list_images
    from .data import load_image_files
    from .errors import DataError
    def same(a, b) -> bool:
        return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)

    from .pipeline import resolve_passes

    specs = resolve_passes(list(args.passes))
    needs = [p for p in specs if hasattr(p, "calib") and p.calib is None]
    for p in specs:
        if hasattr(p, "calib") and same(p.calib, data):
            warnings.warn(f"pass {p.name!r} calibrates on calib={p.calib}, the folder being evaluated: its first "
                          f"{p.calib_images} images are also evaluated; give --calib {p.calib} instead (without "
                          f"calib=) to hold them out")
    if not args.calib:
        if needs:
            raise DataError(f"pass {needs[0].name!r} needs calibration images: give --calib DIR (a folder of images; "
                            f"it may be the --data folder, whose first --calib-images are then held out), or "
                            f"calib=DIR in the pass spec")
        return None, []
    paths = list_images(args.calib)[: args.calib_images]
    images, bad = load_image_files(paths, transform)
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable calibration image(s), e.g. {bad[0]}")
    if not len(images):
        raise DataError(f"--calib {args.calib} has no readable image")
    if len(images) < args.calib_images:
        warnings.warn(f"--calib {args.calib} gave {len(images)} readable images, fewer than --calib-images "
                      f"{args.calib_images}; calibrating on {len(images)}")
    return images, (paths if same(args.calib, data) else [])


def _eval_args(p):
    add_model_args(p)
    p.add_argument("--data", required=True, help="folder of <synset>_*.JPEG images with synsets.txt")
    add_pass_args(p)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "tvm"], help="where the model runs")
    p.add_argument("--target", help="backend target (tvm: cpu, cuda, arm)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="evaluation and throughput batch size")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N images (default: all)")
    p.add_argument("--crop-pct", type=float, help="eval center-crop ratio (default: the paper's, DeiT 0.875)")
    add_calib_args(p)
    p.add_argument("--json", help="write the numbers as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_args(p)


@command("eval", _eval_args)
def cmd_eval(args) -> int:
    """Top-1, agreement with the unpruned model, GMACs and throughput, pruned beside unpruned."""
    from . import compile as vp_compile
    from .data import check_labels
    from .eval import ImageFolder, evaluate, make_loader, throughput
    from .files import write_text
    from .models import eval_transform

    torch.set_num_threads(args.threads)
    model = model_from_args(args)
    transform = eval_transform(model, args.crop_pct)
    calibration, held_out = calibration_from_args(args, transform, data=args.data)
    dataset = ImageFolder(args.data, transform, limit=args.limit, exclude=held_out)
    check_labels(dataset, model.num_classes)
    if calibration is not None:
        where = f"held out from {args.data}" if held_out else f"from {args.calib}"
        print(f"calibration: {len(calibration)} images {where}; evaluation: {len(dataset)} images", file=sys.stderr)
    options = _backend_options(args)
    progress = not args.no_progress
    compiled = vp_compile(model, passes=args.passes, backend=args.backend, calibration=calibration,
                          progress=progress, **options)
    pruned = bool(args.passes)
    reference = model if pruned or args.backend != "torch" else None
    remote = options.get("device")
    fn = EagerComparison(compiled) if remote is not None else compiled
    res = evaluate(fn, make_loader(dataset, args.batch_size), reference=reference, progress=progress)
    if reference is None:  # identity pipeline on torch: the reference is the model itself
        res["top1_agreement"], res["top1_reference"] = 100.0, res["top1"]
    shape = tuple(compiled.example_inputs[0].shape[1:])
    if remote is not None:  # timed on the device; the unpruned model is not built there too
        img_s = base_img_s = _device_throughput(compiled, fn, remote)
    else:
        img_s = throughput(compiled, batch_size=args.batch_size, threads=args.threads, image_shape=shape, repeats=3)
        base_img_s = img_s
    if pruned and remote is None:  # the unpruned model on the same backend, measured in the same run
        base = vp_compile(model, passes=[], backend=args.backend, progress=False, **options)
        base_img_s = throughput(base, batch_size=args.batch_size, threads=args.threads, image_shape=shape, repeats=3)
    out = {
        "model": args.model, "passes": [p.spec() for p in args.passes], "backend": args.backend, "weights": model.vitprune_weights,
        "top1": res["top1"], "top1_agreement": res["top1_agreement"], "top1_reference": res["top1_reference"],
        "correct": res["correct"], "images": res["images"], "skipped": res["skipped"],
        "calibration_images": 0 if calibration is None else len(calibration), "calibration_held_out": bool(held_out),
        "gmacs": compiled.report.gmacs_after, "gmacs_base": compiled.report.gmacs_before,
        "throughput_img_s": img_s, "throughput_base_img_s": base_img_s, "speedup": img_s / base_img_s,
        "batch_size": args.batch_size, "threads": args.threads, "report": compiled.report.to_dict(),
    }
    if remote is not None:
        out.update(device=str(remote), **fn.summary())
    cols = ["model", "passes", "backend", "top-1 %", "agreement %", "GMACs", "img/s", "speedup"]
    rows = [[args.model, "- (unpruned)", args.backend, f"{out['top1_reference']:.1f}", "100.0",
             f"{out['gmacs_base']:.3f}", f"{base_img_s:.1f}", "1.00x"]] if pruned else []
    rows.append([args.model, describe(args.passes), args.backend,
                 f"{out['top1']:.1f} ({out['correct']}/{out['images']})", f"{out['top1_agreement']:.1f}",
                 f"{out['gmacs']:.3f}", f"{img_s:.1f}", f"{out['speedup']:.2f}x"])
    print(format_table(cols, rows))
    if args.json:
        write_text(args.json, json.dumps(out, indent=2, default=str), "--json file")
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
    import os

    from . import compile as vp_compile
    from .data import load_image_files
    from .eval.viz import kept_token_map
    from .errors import DataError
    from .files import check_writable
    from .models import eval_transform

    if not args.passes:
        raise ValueError("viz needs at least one token pass, e.g. --pass zero-tprune:target_gmacs=0.96")
    check_writable(args.out, "--out image")
    model = model_from_args(args, uses_accuracy=False)
    if not os.path.isfile(args.image):
        raise DataError(f"image {args.image} does not exist")
    x, bad = load_image_files([args.image], eval_transform(model))
    if bad:
        raise DataError(f"{args.image} is not a readable image (corrupt, or not an image format PIL reads)")
    compiled = vp_compile(model, passes=args.passes, example_inputs=x, progress=False)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    res = kept_token_map(compiled, x, args.out, **{k: cfg[k] for k in ("mean", "std") if k in cfg},
                         title=f"{describe(args.passes)}: {compiled.report.gmacs_after:.3f} GMACs")
    if not res["layers"]:
        raise ValueError(f"the passes {describe(args.passes)} prune or merge no tokens; nothing to draw")
    print(f"wrote {res['out']}: {len(res['layers'])} layers, {res['gmacs']:.3f} GMACs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f)
    return 0


def _search_args(p):
    add_model_args(p)
    p.add_argument("--data", required=True, help="calibration folder of <synset>_*.JPEG images with synsets.txt")
    p.add_argument("--target-gmacs", type=float, required=True, help="GMACs budget per image")
    p.add_argument("--trials", type=positive_int, default=20, help="random schedules to try")
    p.add_argument("--images", type=positive_int, default=100, help="calibration images (the first N of the folder)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the search")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--out", required=True, help="JSON file for the best zero-tprune config")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("search", _search_args)
def cmd_search(args) -> int:
    """Monte Carlo search of a Zero-TPrune schedule for a GMACs budget on calibration images."""
    from .search import search_schedule

    from .files import check_writable, write_text

    check_writable(args.out, "--out file")
    torch.set_num_threads(args.threads)
    model = model_from_args(args)
    best = search_schedule(model, args.data, args.target_gmacs, trials=args.trials, images=args.images,
                           seed=args.seed, progress=not args.no_progress)
    write_text(args.out, json.dumps(best, indent=2), "--out file")
    from .passes.base import Pass

    spec = " ".join(Pass.from_config(c).spec() for c in best["passes"])
    print(f"best of {args.trials}: agreement {best['agreement']:.1f} % on {best['images']} images, "
          f"{best['gmacs']:.3f} GMACs -> {args.out}\n  --pass {spec}   (or --config {args.out})")
    return 0


def _sweep_args(p):
    from .sweep import METHODS

    add_model_args(p)
    p.add_argument("--data", required=True, help="folder of <synset>_*.JPEG images with synsets.txt (held-out images)")
    p.add_argument("--calib", help="calibration image folder (default: split from --data, never the held-out images)")
    p.add_argument("--calib-images", type=int, default=64, help="calibration images (default 64)")
    p.add_argument("--backend", default="onnx", choices=["torch", "onnx", "tvm"], help="where latency is measured")
    p.add_argument("--target", help="tvm target: cpu (default), cuda, arm")
    p.add_argument("--tracker", help="HOST:PORT of a TVM RPC tracker: measure on a remote device")
    p.add_argument("--device-key", help="device key registered with --tracker")
    p.add_argument("--batch-size", type=int, default=32, help="throughput (img/s) and evaluation batch")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--trials", type=int, default=40, help="trials in the study (a finished study adds none)")
    p.add_argument("--storage", help="Optuna storage URL (postgresql://..., sqlite:///...) or journal file; "
                                     "default OUT/study.journal")
    p.add_argument("--worker", action="store_true", help="join a study other runs plan; run its waiting trials")
    p.add_argument("--pick", default="max-drop=1.0", help="rule for best.json: max-drop=PT, latency<=MSms, speedup>=X")
    p.add_argument("--limit", type=int, help="use only the first N held-out images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retime", type=int, default=4,
                   help="after the last trial, time the front trials again with N times the call pairs (0: off)")
    p.add_argument("--out", required=True, help="folder for frontier.png/.json, report.md, best.json, the study")
    p.add_argument("--no-progress", action="store_true")


@command("sweep", _sweep_args)
def cmd_sweep(args) -> int:
    """Measure the accuracy-vs-latency frontier (Optuna) on your images and device; write best.json."""
    import signal

    from .sweep import sweep

    def stop(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)          # `kill PID` stops like Ctrl-C: the running trial is recorded
    try:
        res = sweep(args.model, args.data, args.out, weights=args.weights, calib=args.calib,
                    calib_images=args.calib_images, backend=args.backend, target=args.target, tracker=args.tracker,
                    device_key=args.device_key, batch_size=args.batch_size,
                    methods=[m.strip() for m in args.methods.split(",") if m.strip()], trials=args.trials,
                    storage=args.storage, worker=args.worker, pick=args.pick, limit=args.limit, threads=args.threads,
                    seed=args.seed, retime=args.retime, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"vitprune: interrupted; finished trials stay in the study (under {args.out} or --storage); "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    print(f"{len(res.records) - len(res.failed)} trials completed, {len(res.failed)} failed, "
          f"{len(res.front)} on the front -> {args.out}/frontier.png, report.md")
    print(res.pick_message + (f" -> {args.out}/best.json" if res.best else ""))
    return 0 if res.best else 1


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
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "tvm"],
                   help="artefact format: torch .pt2, onnx .onnx, tvm .so")
    p.add_argument("--target", help="tvm target: cpu (default), cuda, arm")
    p.add_argument("--arch", help="CUDA arch for --target cuda, e.g. sm_80")
    p.add_argument("--tune", action="store_true", help="tvm cpu: MetaSchedule-tune first (cached)")
    p.add_argument("--trials", type=positive_int, default=None,
                   help="tvm: mean MetaSchedule trials per tuned task (budget = N x tasks worth tuning)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="example batch (TVM builds for this batch)")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="CPU threads")
    add_calib_args(p)
    p.add_argument("--out", required=True, help="artefact path: .pt2 (torch), .onnx, .so (tvm)")
    add_device_args(p)


def _compile_from_args(args, check_parity=True):
    import os

    from . import compile as vp_compile
    from .models import eval_transform

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    model = model_from_args(args)
    if not hasattr(args, "calib"):
        args.calib = None
    calibration, _ = calibration_from_args(args, eval_transform(model))
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
    from .backends import check_export_path

    check_export_path(args.backend, args.out)  # before minutes of compiling
    compiled = _compile_from_args(args)
    path = compiled.export(args.out)
    extra = [p for p in (path + ".json", path + ".cu") if args.backend == "tvm" and __import__("os").path.exists(p)]
    print(f"wrote {path}" + (f" (+ {', '.join(extra)})" if extra else ""))
    print(compiled.report)
    return 0


def _tune_args(p):
    add_model_args(p)
    add_pass_args(p)
    p.add_argument("--trials", type=positive_int, default=None,
                   help="mean MetaSchedule trials per tuned task (default: the package's); "
                        "tasks the target's database already has cost nothing")
    p.add_argument("--batch-size", type=positive_int, default=1, help="batch size to tune for")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="threads (TVM num-cores)")
    p.add_argument("--target", default="cpu", help="cpu (this machine), or arm with --tracker (tune on the board)")
    p.add_argument("--out", help="also export the tuned library here (.so, for the device it was tuned on)")
    add_calib_args(p)
    add_device_args(p)


@command("tune", _tune_args)
def cmd_tune(args) -> int:
    """MetaSchedule-tune a (pruned) model for this CPU or a remote device; cached under $VITPRUNE_CACHE (second run is free)."""
    from .backends.tvm.tuning import cache_root
    from .files import check_folder

    args.backend, args.tune = "tvm", True
    check_folder(cache_root(), "the tuning cache (VITPRUNE_CACHE)")
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
    p.add_argument("--repeat", type=positive_int, default=5, help="time_evaluator repeats (the median is reported)")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="CPU threads (local cpu)")
    add_calib_args(p)
    p.add_argument("--json", help="write the rows as JSON to this file")
    add_device_args(p)


@command("bench", _bench_args)
def cmd_bench(args) -> int:
    """Time the TVM library on the device (time_evaluator, median of repeats): untuned vs tuned (cached), per batch size."""
    import os

    from . import compile as vp_compile
    from .backends.tvm.backend import TvmBackend
    from .models import eval_transform

    args.backend = "tvm"
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    device = device_from_args(args)
    model = model_from_args(args, uses_accuracy=False)
    calibration, _ = calibration_from_args(args, eval_transform(model))
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
    from . import devices

    return devices.from_flags(getattr(args, "tracker", None), getattr(args, "device_key", None),
                              getattr(args, "backend", "tvm"), timeout=args.device_timeout)


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
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0],
                           formatter_class=_HelpFormatter)
        configure(p)
        p.add_argument("--verbose", action="store_true", help="show TVM's and MetaSchedule's log live")
        p.set_defaults(func=fn)
    return parser


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default where it says something (not None, False or empty) and the help does not."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and "default" not in text and action.default not in (None, False, [], argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"vitprune: warning: {message}\n"


def _os_error_line(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}:{where}" if exc.strerror else str(exc)


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``vitprune`` command; returns the exit status."""
    from .errors import VitpruneError

    import os
    import warnings

    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["VITPRUNE_VERBOSE"] = "1"
    shown, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        if getattr(args, "passes", None) is not None:
            args.passes = resolve_cli_passes(args)
        return args.func(args)
    except (VitpruneError, ValueError) as exc:
        print(f"vitprune: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"vitprune: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
