"""What each pass costs: README's summary table, in one run.

For each pass spec, on the real DeiT-T and a folder of real images: GMACs (we count MACs), top-1 and
its change against the unpruned model, top-1 agreement with it, latency at batch 1 (ms) and
throughput at ``--batch-size`` (img/s) on ``--backend`` as speedups over the unpruned model measured
in the same run, seconds to compile (passes + lowering) and whether the pass calibrates. Passes that
calibrate use the first ``--calib-images`` images of the folder; top-1 is measured on the others,
for every row (so all rows see the same held-out images).

    PYTHONPATH=. python benchmarks/pass_costs.py \\
        --weights ../shared/models/deit_tiny_patch16_224.safetensors \\
        --data ../shared/data/imagenet-sample --backend onnx --threads 2 --json docs/pass_costs.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import vitprune
from vitprune.data import list_images
from vitprune.data import ImageFolder, load_image_files, make_loader
from vitprune.eval.metrics import evaluate
from vitprune.eval.speed import latency, throughput
from vitprune.models import eval_transform, load_model

SPECS = [
    "zero-tprune:target_gmacs=0.96",
    "zero-tprune:target_gmacs=0.75",
    "tome:target_gmacs=0.96",
    "tome:target_gmacs=0.75",
    "snp:target_gmacs=1.125",
    "snp:target_gmacs=1.0",
    "head-prune:heads=1",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pass", dest="specs", action="append", help="pass spec (repeatable; default: the README rows)")
    ap.add_argument("--backend", default="onnx", choices=["torch", "onnx", "tvm"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="held-out images (default: all after the calibration ones)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_model(args.model, args.weights)
    transform = eval_transform(model)
    calib_paths = list_images(args.data)[: args.calib_images]
    calib, _ = load_image_files(calib_paths, transform)
    held_out = ImageFolder(args.data, transform, limit=args.limit, exclude=calib_paths)
    loader = make_loader(held_out, 50)
    opts = {"threads": args.threads} if args.backend == "onnx" else {}

    def measure(passes):
        t0 = time.time()
        cm = vitprune.compile(model, passes=passes, backend=args.backend, calibration=calib, progress=False,
                              check_parity="warn", **opts)
        seconds = time.time() - t0
        res = evaluate(cm, loader, reference=model, progress=False)
        return cm, seconds, res

    def speed(fn):
        return latency(fn, threads=args.threads), throughput(fn, args.batch_size, args.threads)

    base, base_s, base_res = measure([])
    base_ms, base_ips = speed(base)
    rows = [{"pass": "-", "gmacs": base.report.gmacs_after, "top1": base_res["top1"], "delta_top1": 0.0,
             "agreement": 100.0, "latency_ms": base_ms, "img_s": base_ips, "speedup_b1": 1.0,
             f"speedup_b{args.batch_size}": 1.0, "compile_s": base_s, "calibrates": False}]
    for spec in args.specs or SPECS:
        cm, secs, res = measure([spec])
        # the unpruned model is timed again right before the pruned one: the machine's load drifts over a run
        base_ms, base_ips = speed(base)
        ms, ips = speed(cm)
        rows.append({"pass": spec, "gmacs": cm.report.gmacs_after, "top1": res["top1"],
                     "delta_top1": res["top1"] - base_res["top1"], "agreement": res["top1_agreement"],
                     "latency_ms": ms, "img_s": ips, "speedup_b1": base_ms / ms,
                     f"speedup_b{args.batch_size}": ips / base_ips, "compile_s": secs,
                     "calibrates": cm.passes[0].name in ("snp", "head-prune")})
        print(f"{spec}: done", flush=True)
    b = args.batch_size
    print(f"\n{args.model}, {held_out.__len__()} held-out images (calibration: the first {args.calib_images}), "
          f"backend {args.backend}, {args.threads} threads; speedups are ratios to the unpruned model in this run\n")
    print(f"| pass | GMACs | top-1 % (change) | agreement % | speedup b1 | speedup b{b} | compile s | calibrates |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['pass']}` | {r['gmacs']:.3f} | {r['top1']:.1f} ({r['delta_top1']:+.1f}) | {r['agreement']:.1f} | "
              f"{r['speedup_b1']:.2f}x | {r[f'speedup_b{b}']:.2f}x | {r['compile_s']:.0f} | "
              f"{'yes' if r['calibrates'] else 'no'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
