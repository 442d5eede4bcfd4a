"""Which backend runs a sweep's chosen point faster: the passes of a best.json and the unpruned model on
onnxruntime and TVM, timed side by side in one run (round-robin calls, median of repeats).

    python benchmarks/sweep_backends.py --config sweep/best.json --weights ../shared/models/deit_tiny_patch16_224.safetensors \
        [--backends onnx,tvm] [--batch-size 1] [--repeats 15] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import vitprune
from vitprune.eval.speed import interleaved
from vitprune.models import load_model
from vitprune.passes.base import Pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="best.json written by vitprune sweep")
    ap.add_argument("--weights")
    ap.add_argument("--backends", default="onnx,tvm")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = json.load(open(args.config))
    model = load_model(cfg["model"], args.weights)
    x = torch.randn(args.batch_size, 3, 224, 224)
    example = (torch.zeros_like(x),)
    mods = {}
    for be in args.backends.split(","):
        opts = {"threads": args.threads} if be == "onnx" else {"target": "cpu"} if be == "tvm" else {}
        mods[(be, "unpruned")] = vitprune.compile(model, [], backend=be, example_inputs=example, progress=False, **opts)
        mods[(be, "chosen")] = vitprune.compile(model, [Pass.from_config(c) for c in cfg["passes"]], backend=be,
                                                example_inputs=example, progress=False, **opts)
    times = interleaved(mods, x, args.repeats)        # round-robin: every module sees the same load
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    rows = [{"backend": be, "model": what, "ms": ms[(be, what)], "img_s": 1000 * args.batch_size / ms[(be, what)]}
            for be, what in mods]
    print(f"{cfg['spec']} at batch {args.batch_size}, {args.threads} threads, median of {args.repeats}")
    for r in rows:
        print(f"  {r['backend']:5s} {r['model']:9s} {r['ms']:8.2f} ms  {r['img_s']:8.1f} img/s")
    chosen = sorted((ms[(be, "chosen")], be) for be, what in mods if what == "chosen")
    print(f"faster for the chosen point: {chosen[0][1]} ({chosen[-1][0] / chosen[0][0]:.2f}x over {chosen[-1][1]})")
    if args.json:
        json.dump({"spec": cfg["spec"], "batch_size": args.batch_size, "rows": rows, "faster": chosen[0][1]},
                  open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
