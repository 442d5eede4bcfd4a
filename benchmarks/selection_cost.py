"""What choosing the tokens costs at batch 1 on onnxruntime: the same kept-token counts chosen by
Zero-TPrune (WPR + S-stage), by CLS-attention top-k and by a fixed random order (the smallest
selection subgraph: a constant ranking, a top-k and the gathers), next to the unpruned model.

All variants have the same token schedule (one ``zero-tprune`` spec, only ``importance`` changes),
so their MACs differ only by the selection's own (tiny) MACs; the gap between ``random`` and
``wpr`` is what Zero-TPrune's selection subgraph costs in time. All sessions are timed round-robin
in one run (:func:`vitprune.eval.speed.interleaved`, median of --repeats calls, spinning off as in the sweep); the ONNX node count of each
graph is printed next to it.

    python benchmarks/selection_cost.py --weights ../shared/models/deit_tiny_patch16_224.safetensors \\
        [--pass "zero-tprune:prune_blocks=3;5;7;9,target_gmacs=0.87758"] [--threads 2] [--batch-size 1]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import vitprune
from vitprune.eval.speed import interleaved
from vitprune.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--weights", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models",
                                                      "deit_tiny_patch16_224.safetensors"))
    ap.add_argument("--pass", dest="spec", default="zero-tprune:prune_blocks=3;5;7;9,target_gmacs=0.87758",
                    help="a zero-tprune spec (without importance=); the schedule every variant shares")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    if not args.spec.startswith("zero-tprune") or "importance=" in args.spec:
        raise SystemExit("--pass: give a zero-tprune spec without importance= (the script sets it)")
    model = load_model(args.model, args.weights)
    x = torch.randn(args.batch_size, 3, 224, 224)
    variants = {"unpruned": []} | {imp: [f"{args.spec},importance={imp}"] for imp in ("wpr", "cls", "random")}
    mods = {k: vitprune.compile(model, p, backend="onnx", example_inputs=(torch.zeros_like(x),), progress=False,
                                threads=args.threads, spin=False) for k, p in variants.items()}
    times = interleaved(mods, x, args.repeats, warmup=1)
    base = statistics.median(times["unpruned"])
    print(f"{args.spec}, batch {args.batch_size}, {args.threads} threads, median of {args.repeats}")
    print("| importance | ONNX nodes | GMACs | ms | speed-up |\n|---|---|---|---|---|")
    for k, m in mods.items():
        ms = statistics.median(times[k])
        print(f"| {k} | {len(m.lowered.model.graph.node)} | {m.report.gmacs_after:.3f} | {1000 * ms:.2f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
