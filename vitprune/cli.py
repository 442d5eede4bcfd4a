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
    res = evaluate(compiled, make_loader(dataset, args.batch_size), reference=reference, progress=not args.no_progress)
    if reference is None:  # identity pipeline on torch: the reference is the model itself
        res["top1_agreement"], res["top1_reference"] = 100.0, res["top1"]
    img_s = throughput(compiled, batch_size=args.batch_size, threads=args.threads, repeats=3)
    out = {
        "model": args.model, "passes": args.passes, "backend": args.backend,
        "top1": res["top1"], "top1_agreement": res["top1_agreement"], "top1_reference": res["top1_reference"],
        "correct": res["correct"], "images": res["images"], "skipped": res["skipped"],
        "gmacs": compiled.report.gmacs_after, "gmacs_base": compiled.report.gmacs_before,
        "throughput_img_s": img_s, "batch_size": args.batch_size, "threads": args.threads,
        "report": compiled.report.to_dict(),
    }
    cols = ["model", "passes", "backend", "top-1 %", "agreement %", "GMACs", "img/s"]
    print(format_table(cols, [[args.model, " ".join(args.passes) or "-", args.backend,
                               f"{out['top1']:.1f} ({out['correct']}/{out['images']})",
                               f"{out['top1_agreement']:.1f}", f"{out['gmacs']:.3f}", f"{img_s:.1f}"]]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


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
                    seed=args.seed, progress=not args.no_progress)
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
        if getattr(args, "arch", None):
            opts["arch"] = args.arch
        if getattr(args, "tune", False):
            opts.update(tune=True, trials=args.trials)
    elif args.backend == "onnx":
        opts["threads"] = args.threads
    elif args.target:
        from .errors import BackendError

        raise BackendError(f"--target applies to --backend tvm only, got --backend {args.backend}")
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
    parity = check_parity and not (args.backend == "tvm" and (args.target or "cpu") != "cpu")
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


@command("tune", _tune_args)
def cmd_tune(args) -> int:
    """MetaSchedule-tune a (pruned) model for this CPU; cached under $VITPRUNE_CACHE (second run is free)."""
    args.backend, args.target, args.tune = "tvm", "cpu", True
    compiled = _compile_from_args(args)
    tr = compiled.lowered.tuning
    lib = getattr(compiled.lowered, "library_path", None)
    what = "cache hit" if tr.cache_hit else f"tuned {tr.num_tasks} tasks, {tr.trials} trials"
    print(f"{what} in {tr.seconds:.1f} s; database: {tr.work_dir}"
          + (f"; built library loaded from the cache: {lib}" if lib else ""))
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
