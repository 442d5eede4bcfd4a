"""Zero-TPrune accuracy on real images vs GMACs, against CLS-attention top-k and random dropping.

Real DeiT-T (../shared/models) on ../shared/data/imagenet-sample (500 images), no fine-tuning.
For each variant and GMACs budget the pass is compiled with ``target_gmacs`` (GMACs measured
on the pruned graph, pruning-layer work included) and evaluated; the script prints a
markdown table with top-1, the drop vs the unpruned model and top-1 agreement with the
unpruned model, on the first 250 images (used to choose defaults), the last 250 (held out)
and all 500.

    python benchmarks/zero_tprune_accuracy.py                      # default table
    python benchmarks/zero_tprune_accuracy.py --budgets 0.96 --variant \
        'mine={"importance": "wpr", "rs_ratio": 0.7}'                 # ad-hoc ablation

Variants are ZeroTPrune keyword dicts without the budget; ``target_gmacs`` is added.

Last run (2 CPU cores, ~3 min): agreement with the unpruned model / top-1 drop, all 500 images

    budget  zero-tprune (merge)  prune (paper)   cls top-k      random
    0.96    94.4 % / 0.4 pt      92.2 % / 2.0    92.8 % / 2.4   87.0 % / 3.8
    0.85    92.6 % / 1.6 pt      88.0 % / 4.4    88.8 % / 4.4   83.4 % / 4.6
    0.75    90.2 % / 3.0 pt      84.0 % / 7.2    82.4 % / 8.4   79.0 % / 8.0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vitprune  # noqa: E402
from vitprune.eval.flops import gmacs  # noqa: E402
from vitprune.passes.zero_tprune import ZeroTPrune  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("VITPRUNE_SHARED", os.path.join(HERE, "..", "..", "shared"))
DEFAULT_DATA = os.path.join(SHARED, "data", "imagenet-sample")
DEFAULT_WEIGHTS = os.path.join(SHARED, "models", "deit_tiny_patch16_224.safetensors")

VARIANTS = {
    "zero-tprune": {},                                          # defaults: merge, rs_ratio 0.7
    "zero-tprune prune (paper)": {"mode": "prune", "rs_ratio": 0.5},
    "cls-topk": {"importance": "cls"},
    "random": {"importance": "random"},
}


def load_images(folder: str, model, cache: str | None = None):
    """``(images [N,3,224,224], labels [N])`` in file order, with the project's eval transform
    (:func:`vitprune.models.eval_transform`: DeiT crop 0.875) and loader."""
    if cache and os.path.exists(cache):
        return torch.load(cache)
    from vitprune.eval.data import ImageFolder, make_loader
    from vitprune.models import eval_transform

    xs, ys = [], []
    for x, y, _ in make_loader(ImageFolder(folder, eval_transform(model))):
        xs.append(x)
        ys.append(y)
    out = (torch.cat(xs), torch.cat(ys))
    if cache:
        torch.save(out, cache)
    return out


@torch.no_grad()
def predict(fn, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    return torch.cat([fn(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])


def stats(pred, ref, labels, sl):
    top1 = (pred[sl] == labels[sl]).float().mean().item() * 100
    agree = (pred[sl] == ref[sl]).float().mean().item() * 100
    return top1, agree


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--budgets", default="0.96,0.85,0.75", help="GMACs budgets, comma-separated")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=JSON ZeroTPrune options (repeatable); default: zero-tprune, cls-topk, random")
    ap.add_argument("--only", default=None, help="evaluate only images [a:b] (e.g. 0:250)")
    ap.add_argument("--cache", default=None, help="cache the transformed images in this .pt file")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from vitprune.models import load_model

    model = load_model(args.model, args.weights)
    images, labels = load_images(args.data, model, args.cache)
    if args.only:
        a, b = (int(v) for v in args.only.split(":"))
        images, labels = images[a:b], labels[a:b]
    n = len(labels)
    half = n // 2
    slices = {"first": slice(0, half), "last": slice(half, n), "all": slice(0, n)}

    variants = dict(VARIANTS) if not args.variant else {}
    for item in args.variant:
        name, _, js = item.partition("=")
        variants[name] = json.loads(js) if js else {}
    budgets = [float(b) for b in args.budgets.split(",") if b]

    example = images[:2]
    ref = predict(model, images)
    dense_g = gmacs(model)
    rows = [dict(variant="unpruned", budget=None, gmacs=dense_g,
                 **{f"top1_{k}": stats(ref, ref, labels, s)[0] for k, s in slices.items()},
                 **{f"agree_{k}": 100.0 for k in slices})]
    base = {k: rows[0][f"top1_{k}"] for k in slices}
    for budget in budgets:
        for name, opts in variants.items():
            t0 = time.time()
            p = ZeroTPrune(target_gmacs=budget, **opts)
            cm = vitprune.compile(model, passes=[p], example_inputs=example, progress=False)
            pred = predict(cm, images)
            row = dict(variant=name, budget=budget, gmacs=cm.report.gmacs_after,
                       tokens=cm.report.passes[0]["tokens_per_layer"], seconds=round(time.time() - t0, 1))
            for k, s in slices.items():
                row[f"top1_{k}"], row[f"agree_{k}"] = stats(pred, ref, labels, s)
            rows.append(row)
            print(f"  {name:>14} @ {budget}: top1 {row['top1_all']:.1f} agree {row['agree_all']:.1f} "
                  f"(first {row['agree_first']:.1f} / last {row['agree_last']:.1f}) {row['seconds']} s",
                  file=sys.stderr, flush=True)

    print(f"\n{args.model}, {n} images of {os.path.basename(os.path.normpath(args.data))}; "
          f"first/last = images [0:{half}] / [{half}:{n}]; GMACs measured on the pruned graph\n")
    print("| variant | budget | GMACs | kept tokens per layer | top-1 all | drop (pt) | agree all | agree first | agree last | top-1 first | top-1 last |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        drop = base["all"] - r["top1_all"]
        print(f"| {r['variant']} | {r['budget'] or '-'} | {r['gmacs']:.3f} | {r.get('tokens', '-')} | "
              f"{r['top1_all']:.1f} | {drop:+.1f} | {r['agree_all']:.1f} | {r['agree_first']:.1f} | "
              f"{r['agree_last']:.1f} | {r['top1_first']:.1f} | {r['top1_last']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
