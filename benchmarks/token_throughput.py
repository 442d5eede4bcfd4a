"""Throughput and latency of Zero-TPrune-pruned vs unpruned DeiT-S, in one run, as ratios.

Both sides are the same captured graph run by the torch backend (the unpruned one with no
pass), so the ratio measures token pruning alone. Random weights (speed does not depend on
them). Pruned and unpruned calls are interleaved, repeat by repeat, and medians are compared,
so that load from other processes hits both sides alike.

    PYTHONPATH=. python benchmarks/token_throughput.py --threads 2

Acceptance (issue 3): throughput ratio >= 1.40 at batch 32 (the GMACs ratio, ~1.55, is the limit).
"""

from __future__ import annotations

import argparse
import os
import statistics

import timm
import torch

import vitprune
from vitprune.eval.speed import interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--pass", dest="spec", default="zero-tprune:preset=a")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds at the batch size")
    ap.add_argument("--latency-repeats", type=int, default=30, help="interleaved rounds at batch 1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    example = torch.randn(2, 3, 224, 224)
    unpruned = vitprune.compile(model, [], example_inputs=example, progress=False)
    pruned = vitprune.compile(model, [args.spec], example_inputs=example, progress=False)
    fns = {"unpruned": unpruned, "pruned": pruned}
    load = os.getloadavg()
    tb = interleaved(fns, torch.randn(args.batch_size, 3, 224, 224), args.repeats)
    tl = interleaved(fns, torch.randn(1, 3, 224, 224), args.latency_repeats, warmup=3)
    load_end = os.getloadavg()
    thr = {k: args.batch_size / statistics.median(v) for k, v in tb.items()}
    lat = {k: 1000 * statistics.median(v) for k, v in tl.items()}
    g0, g1 = unpruned.report.gmacs_before, pruned.report.gmacs_after
    print(f"\n{args.model} (random weights), {args.spec}, torch backend, {args.threads} threads; "
          f"load average {load[0]:.1f} at start, {load_end[0]:.1f} at end (cores: {os.cpu_count()})\n")
    print("| | GMACs | throughput b{0} (img/s, median of {1}) | latency b1 (ms, median of {2}) |".format(
        args.batch_size, args.repeats, args.latency_repeats))
    print("|---|---|---|---|")
    for k, g in (("unpruned", g0), ("pruned", g1)):
        print(f"| {k} | {g:.3f} | {thr[k]:.1f} | {lat[k]:.1f} |")
    print(f"| ratio | {g0 / g1:.2f}x fewer | {thr['pruned'] / thr['unpruned']:.2f}x | "
          f"{lat['unpruned'] / lat['pruned']:.2f}x faster |")
    print(f"\ntokens per block: {pruned.report.passes[0].get('tokens_per_block')}")


if __name__ == "__main__":
    main()
