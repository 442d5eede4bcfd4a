"""Latency of one model through every backend, unpruned and pruned, at batch 1 and 8, in one run.

    PYTHONPATH=. python benchmarks/backends_latency.py [--weights ../shared/models/deit_tiny_patch16_224.safetensors]
        [--pass SPEC]... [--threads 1] [--tune pruned] [--trials 16] [--batches 1 8]

Rows: torch eager, torch.compile, onnxruntime, TVM untuned, TVM tuned. "TVM tuned" is tuned now with
MetaSchedule for the variants named by --tune at --tune-batch (the cache makes a second run free),
and read from the tuning cache for the others (``n/a`` when nothing is cached). Latency is the median
of --repeats calls after 3 warm-ups (ms per call, all images of the batch); the ratio is to torch eager
of the same variant, measured in the same run. Pruned = the --pass list (default ``explicit-attention``
until a token-pruning pass lands).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--weights", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models",
                                                      "deit_tiny_patch16_224.safetensors"))
    ap.add_argument("--pass", dest="passes", action="append", default=None, metavar="SPEC",
                    help="pass spec of the pruned variant (repeat); default explicit-attention")
    ap.add_argument("--threads", type=int, default=1, help="threads for every backend (TVM num-cores too)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tune", nargs="*", default=[], choices=["unpruned", "pruned"], help="variants to tune now")
    ap.add_argument("--tune-batch", type=int, default=1)
    ap.add_argument("--trials", type=int, default=None,
                    help="mean MetaSchedule trials per tuned task (default: the package's)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--variants", nargs="+", default=["unpruned", "pruned"], choices=["unpruned", "pruned"])
    ap.add_argument("--skip", nargs="*", default=[], help="rows to skip: eager compile onnx tvm tvm-tuned")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import torch

    import vitprune
    from vitprune.models import load_model

    torch.set_num_threads(args.threads)
    weights = args.weights if args.weights and os.path.exists(args.weights) else None
    model = load_model(args.model, weights)
    variants = {"unpruned": [], "pruned": args.passes or ["explicit-attention"]}

    def timed(fn, x):
        with torch.no_grad():
            for _ in range(3):
                fn(x)
            ts = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t)
        return 1000 * statistics.median(ts)

    rows = []
    for vname, passes in variants.items():
        if vname not in args.variants:
            continue
        for b in args.batches:
            x = torch.randn(b, 3, 224, 224)
            results = {}
            builds = [("torch eager", "eager", dict(backend="torch")),
                      ("torch.compile", "compile", dict(backend="torch", mode="compile")),
                      ("onnxruntime", "onnx", dict(backend="onnx", threads=args.threads)),
                      ("TVM untuned", "tvm", dict(backend="tvm", use_cache=False))]
            tune_now = vname in args.tune and b == args.tune_batch
            builds.append(("TVM tuned", "tvm-tuned",
                           dict(backend="tvm", tune=tune_now, trials=args.trials)))
            for label, key, opts in builds:
                if key in args.skip:
                    continue
                t0 = time.time()
                try:
                    c = vitprune.compile(model, passes=passes, example_inputs=x, progress=False, **opts)
                except Exception as exc:  # report and go on: one failing backend must not hide the others
                    print(f"[{vname} b{b}] {label}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    continue
                if key == "tvm-tuned" and c.lowered.tuning is None:
                    print(f"[{vname} b{b}] {label}: n/a (no tuning cached; run with --tune {vname})", flush=True)
                    continue
                build_s = time.time() - t0
                ms = timed(c, x)
                results[label] = ms
                extra = ""
                if key == "tvm-tuned":
                    tr = c.lowered.tuning
                    extra = f" ({'cache hit' if tr.cache_hit else f'tuned {tr.trials} trials'}, {tr.seconds:.0f} s)"
                print(f"[{vname} b{b}] {label}: {ms:.1f} ms (build {build_s:.1f} s){extra}", flush=True)
            ref = results.get("torch eager")
            for label, ms in results.items():
                rows.append((vname, b, label, ms, ms / ref if ref else float("nan")))
    print(f"\n{args.model}, {args.threads} thread(s), median of {args.repeats}; ratio = latency / torch eager")
    print("| variant | batch | backend | latency ms | ratio |\n|---|---|---|---|---|")
    for v, b, label, ms, r in rows:
        print(f"| {v} | {b} | {label} | {ms:.1f} | {r:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
