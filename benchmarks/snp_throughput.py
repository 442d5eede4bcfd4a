"""Throughput of SNP presets vs the unpruned model, one run, interleaved repeats, ratios.

DeiT-S with random weights (speed does not depend on the weight values), batch 32, on the torch
backend or onnxruntime (``--backend onnx``; sessions built with spinning off, as the sweep does,
because they take turns on the same cores). Each round times every model once, in turn, so background load hits all alike;
the ratio of medians is printed.

    PYTHONPATH=. python benchmarks/snp_throughput.py --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--presets", nargs="+", default=["deit-s", "deit-s-small"])
    ap.add_argument("--extra", nargs="*", default=[], help="extra pass pipelines, ';'-free specs joined by '+'")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    ap.add_argument("--round-to", nargs="+", default=["default", "1"],
                    help="one preset row per value: layer widths rounded to multiples of it ('default': the "
                         "preset's default, 16 for deit-s and deit-b, 8 for deit-t and deit-s-small; 1 = the released widths, whose odd sizes such as 307 or 150 run "
                         "far below peak in oneDNN on some CPUs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import timm

    import vitprune
    from vitprune.eval.speed import interleaved

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    example = torch.randn(2, 3, 224, 224)
    calib = torch.randn(4, 3, 224, 224)
    pipelines = {"unpruned": []}
    for p in args.presets:
        for r in args.round_to:
            spec = f"snp:preset={p},compensate=false,sequential=false,calib_images=4"
            name = f"snp-{p}"
            if r != "default":
                spec, name = spec + f",round_to={int(r)}", name + (" (released widths)" if int(r) == 1 else f" (round_to={r})")
            pipelines[name] = [spec]
    for e in args.extra:
        pipelines[e] = e.split("+")
    compiled = {}
    opts = {"threads": args.threads, "spin": False} if args.backend == "onnx" else {}
    for name, passes in pipelines.items():
        compiled[name] = vitprune.compile(model, passes, backend=args.backend, example_inputs=example,
                                          calibration=calib, progress=False, **opts)
        print(f"{name}: {compiled[name].report.gmacs_after:.3f} GMACs", flush=True)
    x = torch.randn(args.batch, 3, 224, 224)
    times = interleaved(compiled, x, args.rounds, warmup=1)
    base = args.batch / statistics.median(times["unpruned"])
    print()
    print(f"| model | GMACs | img/s ({args.backend}, batch {args.batch}, {args.threads} threads) | speed-up |")
    print("|---|---|---|---|")
    for n, c in compiled.items():
        ips = args.batch / statistics.median(times[n])
        print(f"| {n} | {c.report.gmacs_after:.2f} | {ips:.1f} | {ips / base:.2f}x |")


if __name__ == "__main__":
    main()
