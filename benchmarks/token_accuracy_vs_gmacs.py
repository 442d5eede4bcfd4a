"""Accuracy vs GMACs of token pruning / merging on a folder of real images.

Compares, at the same GMACs budgets, Zero-TPrune (WPR importance; the default merge variant and
the paper's dropping, ``mode=prune``), CLS-attention top-k (``importance=cls``), random dropping
(``importance=random``) and ToMe, by top-1 and top-1 agreement with the unpruned model. Every
pass is compiled with ``target_gmacs`` (GMACs measured on the pruned graph, pruning-layer work
included). Prints a markdown table (with the mean KL divergence ``KL(unpruned || pruned)`` of the
softmax outputs, the most sensitive of the three metrics) and writes a PNG plot. Ad-hoc variants (ablations) are
added with ``--method NAME=SPEC`` where SPEC contains ``{g}`` for the budget. A second table gives,
per budget, Zero-TPrune minus each other method in top-1 and agreement (points) with a 95 %
paired bootstrap confidence interval over the images (``scipy.stats.bootstrap``), so that a
difference of a few images can be told from noise.

    PYTHONPATH=. python benchmarks/token_accuracy_vs_gmacs.py \
        --weights ../shared/models/deit_tiny_patch16_224.safetensors \
        --data ../shared/data/imagenet-sample --budgets 0.96 0.85 0.75 --out docs/accuracy_vs_gmacs.png

To choose a default on some images and confirm it on others: ``--limit 250`` (the first 250)
then ``--offset 250`` (the rest), with ``--methods`` / ``--method`` to run only what is compared.

``--augment flip+crops`` also runs every model on deterministic extra views of each image (its
mirror and four corner crops, each mirrored: 10 views, :func:`vitprune.calibration.augment_views`,
the views SNP calibrates on). Top-1, agreement (with the unpruned model on the same view) and KL
are then means over all views; the bootstrap resamples images, each with the mean over its views.
A token-pruning decision that flips one borderline view counts 1/10 of an image instead of a whole
one, so two methods within a few images of each other can be told apart more finely; the
single-view default (center crop) stays the headline number.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm.auto import tqdm

import vitprune
from vitprune.calibration import augment_views, parse_augment
from vitprune.data import ImageFolder, make_loader
from vitprune.models import eval_transform, load_model

METHODS = {
    "zero-tprune": "zero-tprune:target_gmacs={g}",
    "zero-tprune (prune)": "zero-tprune:target_gmacs={g},mode=prune",
    "cls-attention top-k": "zero-tprune:target_gmacs={g},importance=cls",
    "random drop": "zero-tprune:target_gmacs={g},importance=random",
    "tome": "tome:target_gmacs={g}",
}


@torch.no_grad()
def predict(fn, batches) -> torch.Tensor:
    """``[N, classes]`` float32 log-probabilities."""
    return torch.cat([torch.log_softmax(fn(x).float(), dim=-1) for x in batches])


def kl_div(ref_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over images of ``KL(ref || pruned)`` in nats."""
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


def per_image(outcome: torch.Tensor, image_of_row: torch.Tensor, n_images: int) -> torch.Tensor:
    """``[n_images]`` mean over each image's views of a per-row 0/1 ``outcome [rows]``."""
    total = torch.zeros(n_images, dtype=torch.float64).index_add_(0, image_of_row, outcome.double())
    return total / torch.bincount(image_of_row, minlength=n_images).double()


def with_views(batches: list, augment: str) -> tuple[list, torch.Tensor]:
    """The batches to run (each image batch followed by its extra views, one tensor per view) and
    ``[rows]`` the image index of every row, for :func:`per_image`."""
    out, image_of_row, start = [], [], 0
    for x in batches:
        views, _ = augment_views(x, augment, len(x))
        for v in views.split(len(x)):
            out.append(v)
            image_of_row.append(torch.arange(start, start + len(x)))
        start += len(x)
    return out, torch.cat(image_of_row)


def paired_ci(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Mean of ``a - b`` over images, in points, with its 95 % paired bootstrap interval.

    ``a``, ``b``: ``[N]`` per-image outcomes in [0, 1] (correct, or agrees with unpruned; the
    fraction of an image's views with ``--augment``) of two methods on the same images. BCa
    interval, 2000 resamples, fixed seed.
    """
    from scipy.stats import bootstrap

    d = (a.double() - b.double()).numpy() * 100.0
    if d.std() == 0:
        return float(d.mean()), float(d.mean()), float(d.mean())
    ci = bootstrap((d,), lambda x, axis: x.mean(axis=axis), n_resamples=2000, confidence_level=0.95,
                   random_state=0).confidence_interval
    return float(d.mean()), float(ci.low), float(ci.high)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--weights", default="../shared/models/deit_tiny_patch16_224.safetensors")
    ap.add_argument("--data", default="../shared/data/imagenet-sample")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.96, 0.85, 0.75])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                    help="built-in methods to run (none: only the --method ones)")
    ap.add_argument("--method", action="append", default=[], metavar="NAME=SPEC",
                    help="extra method, e.g. 'ztp-6=zero-tprune:target_gmacs={g},prune_blocks=2;4;6;8;9;10'")
    ap.add_argument("--offset", type=int, default=0, help="skip the first N images (sorted by file name)")
    ap.add_argument("--limit", type=int, help="use at most N images (after --offset)")
    ap.add_argument("--augment", default="none",
                    help="also run each image's extra views: none (default, the center crop only), flip, crops "
                         "or flip+crops (10 views); metrics average over views, the bootstrap resamples images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--out", help="PNG plot (default docs/accuracy_vs_gmacs.png, or "
                                  "docs/accuracy_vs_gmacs_<augment>.png with --augment)")
    ap.add_argument("--json", help="write the rows as JSON")
    args = ap.parse_args()
    methods = {name: METHODS[name] for name in args.methods}
    for item in args.method:
        name, sep, spec = item.partition("=")
        if not sep or "{g}" not in spec:
            ap.error(f"--method {item!r}: expected NAME=SPEC with {{g}} in SPEC for the budget")
        methods[name] = spec
    try:
        augments = parse_augment(args.augment)
    except ValueError as exc:
        ap.error(str(exc))
    if args.out is None:
        args.out = "docs/accuracy_vs_gmacs" + "".join("_" + a for a in augments) + ".png"
    torch.set_num_threads(args.threads)

    model = load_model(args.model, args.weights)
    ds = ImageFolder(args.data, eval_transform(model))
    ds.samples = ds.samples[args.offset:]
    if args.limit is not None:
        ds.samples = ds.samples[:args.limit]
    batches, labels = [], []
    for x, y, _ in tqdm(make_loader(ds, args.batch_size), desc="load images", leave=False):
        batches.append(x)
        labels.append(y)
    n_images = sum(len(x) for x in batches)
    batches, image_of_row = with_views(batches, args.augment)
    views = len(image_of_row) // max(n_images, 1)
    labels = torch.cat(labels)[image_of_row]
    ref_logp = predict(model, tqdm(batches, desc="unpruned", leave=False))
    ref = ref_logp.argmax(-1)
    base_top1 = 100.0 * float((ref == labels).float().mean())
    base = vitprune.compile(model, [], example_inputs=batches[0][:2], progress=False).report.gmacs_before
    rows = [{"method": "unpruned", "spec": "-", "gmacs": base, "top1": base_top1, "agreement": 100.0,
             "kl": 0.0}]
    per_image_outcomes = {}             # (method, budget) -> (correct [N images], agrees [N images]), view means
    for g in args.budgets:
        for name, template in methods.items():
            spec = template.format(g=g)
            t0 = time.time()
            try:
                c = vitprune.compile(model, [spec], example_inputs=batches[0][:2], progress=False)
            except Exception as exc:  # report, keep going with the other rows
                rows.append({"method": name, "spec": spec, "error": f"{type(exc).__name__}: {exc}"[:200]})
                print(f"{spec}: {rows[-1]['error']}")
                continue
            logp = predict(c, tqdm(batches, desc=spec, leave=False))
            pred = logp.argmax(-1)
            per_image_outcomes[(name, g)] = (per_image(pred == labels, image_of_row, n_images),
                                             per_image(pred == ref, image_of_row, n_images))
            rows.append({"method": name, "spec": spec, "target": g, "gmacs": c.report.gmacs_after,
                         "top1": 100.0 * float((pred == labels).float().mean()),
                         "agreement": 100.0 * float((pred == ref).float().mean()),
                         "kl": kl_div(ref_logp, logp),
                         "seconds": round(time.time() - t0, 1)})
    first = ds.samples[0][0] if ds.samples else "-"
    shown = f"{n_images} images" + (f" x {views} views ({args.augment})" if views > 1 else "")
    print(f"\n{args.model}, {shown} of {args.data} (from #{args.offset}, {os.path.basename(first)}); "
          f"GMACs = MACs/1e9 per image; KL = mean KL(unpruned || pruned), nats\n")
    print("| method | budget | GMACs | top-1 % | Δ top-1 (pt) | agreement % | KL |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['spec']} | error | {r['error']} | | | |")
            continue
        print(f"| {r['method']} | {r.get('target', '-')} | {r['gmacs']:.3f} | {r['top1']:.1f} | "
              f"{r['top1'] - base_top1:+.1f} | {r['agreement']:.1f} | {r['kl']:.4f} |")
    anchor = "zero-tprune"
    pairs = [(g, n) for g in args.budgets for n in methods if n != anchor
             and (anchor, g) in per_image_outcomes and (n, g) in per_image_outcomes]
    diffs = []
    if pairs:
        print(f"\n{anchor} minus each method, points, with 95 % paired bootstrap intervals over the images\n")
        print("| budget | method | Δ top-1 [95 % CI] | Δ agreement [95 % CI] |")
        print("|---|---|---|---|")
        for g, n in pairs:
            cells = [paired_ci(a, b) for a, b in zip(per_image_outcomes[(anchor, g)], per_image_outcomes[(n, g)])]
            diffs.append({"budget": g, "method": n, "top1": cells[0], "agreement": cells[1]})
            print(f"| {g} | {n} | " + " | ".join(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" for m, lo, hi in cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": n_images, "views": views, "augment": args.augment, "offset": args.offset, "rows": rows,
                       "differences": diffs}, f, indent=2)
    plot(rows, base_top1, base, args.out, f"{args.model}, {shown}, no fine-tuning")


def plot(rows: list, base_top1: float, base_gmacs: float, out: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"zero-tprune": "o-", "zero-tprune (prune)": "D-", "cls-attention top-k": "s--",
              "random drop": "x:", "tome": "^-."}
    names = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "unpruned"))
    for ax, key, ylabel in ((axes[0], "top1", "top-1 (%)"), (axes[1], "agreement", "top-1 agreement with unpruned (%)")):
        for name in names:
            style = styles.get(name, "v-")
            pts = sorted((r["gmacs"], r[key]) for r in rows if r["method"] == name and "error" not in r)
            if pts:
                ax.plot(*zip(*pts), style, label=name, markersize=7)
        ax.axhline(base_top1 if key == "top1" else 100.0, color="grey", lw=0.8)
        ax.plot([base_gmacs], [base_top1 if key == "top1" else 100.0], "k*", markersize=11, label="unpruned")
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
