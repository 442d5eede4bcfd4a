"""Accuracy vs GMACs of SNP on a real model, no fine-tuning (issue 4 "Done when").

Calibrates on the first ``--calib-images`` images of the folder (sorted by file name) and reports
top-1 on the remaining images and, for reference, on all of them. For each GMACs reduction it
compares SNP's scores and the activation-aware scores, with and without least-squares
recovery. Prints a markdown table and writes a PNG.

    PYTHONPATH=. python benchmarks/snp_accuracy.py --reductions 0.1 0.2 0.3 --png docs/snp_accuracy.png

Images come from the project's loader with the model's eval transform (DeiT: crop 0.875), so the
unpruned row matches ``vitprune eval``. ``--allocations uniform fisher`` compares the uniform
per-block ratio with the global Fisher allocation (Kwon et al. 2022 §4.1).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def load_folder(folder: str, model, cache: str | None = None):
    """``(images [N, 3, 224, 224], labels [N])`` in file order with the project's loader and eval
    transform (:func:`vitprune.models.eval_transform`: DeiT crop 0.875), as ``vitprune eval``."""
    if cache and os.path.exists(cache):
        return torch.load(cache)
    from vitprune.data import ImageFolder, make_loader, warn_skipped
    from vitprune.models import eval_transform

    xs, ys, bad = [], [], 0
    for x, y, b in make_loader(ImageFolder(folder, eval_transform(model))):
        xs.append(x)
        ys.append(y)
        bad += b
    warn_skipped(bad, folder)
    out = (torch.cat(xs), torch.cat(ys))
    if cache:
        torch.save(out, cache)
    return out


@torch.no_grad()
def logits(fn, x, bs=50):
    return torch.cat([fn(x[i:i + bs]) for i in range(0, x.shape[0], bs)])


def predict(fn, x, bs=50):
    return logits(fn, x, bs).argmax(-1)


def kl(l_ref, l):
    """Mean ``KL(softmax(l_ref) || softmax(l))`` per image: a continuous, less noisy measure of how
    far the pruned model moved than top-1 on 64 images (1 image = 1.6 pt)."""
    lp, lq = l_ref.log_softmax(-1), l.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--weights", default="../shared/models/deit_tiny_patch16_224.safetensors",
                    help="safetensors file, or 'random' (seeded random weights: for time and shape, e.g. DeiT-S/B; accuracy is meaningless)")
    ap.add_argument("--data", default="../shared/data/imagenet-sample")
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--reductions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--criteria", nargs="+", default=["snp", "activation"])
    ap.add_argument("--compensate", nargs="+", default=["false", "true"])
    ap.add_argument("--allocations", nargs="+", default=["uniform", "fisher"],
                    help="per-block widths: uniform ratio or global Fisher allocation (Kwon et al. 2022)")
    ap.add_argument("--cache", default=None, help="cache the preprocessed images in this .pt file")
    ap.add_argument("--extra", default="", help="extra snp options, e.g. sequential=false")
    ap.add_argument("--cv", action="store_true",
                    help="also prune on each half of the calibration images and measure on the other half "
                         "(two-fold cross-validation: selection on calibration images without refit over-fit)")
    ap.add_argument("--cv-split", choices=("halves", "interleave"), default="halves",
                    help="--cv folds: first / second half of the calibration images, or even / odd indices")
    ap.add_argument("--methods", nargs="+", default=None,
                    choices=("snp", "zero-tprune", "tome", "snp-tokens", "snp-tome"),
                    help="compare methods at the same GMACs instead of SNP variants: SNP alone, token reduction "
                         "alone, and the composition (snp-tokens: SNP then Zero-TPrune; snp-tome: SNP then ToMe); "
                         "--gmacs sets the budgets")
    ap.add_argument("--gmacs", type=float, nargs="+", default=[0.75, 0.63], help="budgets for --methods")
    ap.add_argument("--split", default="0.5", help="snp-tokens split (fraction of the reduction done by SNP) or none")
    ap.add_argument("--time", action="store_true", help="print the seconds spent in the pruning pass per row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", default="docs/snp_accuracy.png")
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", nargs="+", default=None, help="only merge earlier --json/log outputs")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.png, args.model, args.calib_images)
    torch.set_num_threads(args.threads)

    import vitprune
    from vitprune.models import load_model

    if args.weights == "random":
        torch.manual_seed(0)
    model = load_model(args.model, None if args.weights == "random" else args.weights).eval()
    x, y = load_folder(args.data, model, args.cache)
    nc = args.calib_images
    calib, ye = x[:nc], y[nc:]
    example = x[:2]

    base = vitprune.compile(model, [], example_inputs=example)
    l_all = logits(base, x)
    p_all = l_all.argmax(-1)
    base_g = base.report.gmacs_before
    rows = [dict(reduction=0.0, allocation="-", criterion="-", compensate="-", gmacs=base_g,
                 top1_heldout=float((p_all[nc:] == ye).float().mean()), top1_all=float((p_all == y).float().mean()),
                 top1_calib=float((p_all[:nc] == y[:nc]).float().mean()), agree_heldout=1.0, agree_calib=1.0,
                 seconds=0.0)]
    print(json.dumps(rows[0]), flush=True)
    print(f"unpruned: {base_g:.3f} GMACs, top-1 held-out {rows[0]['top1_heldout']:.4f} "
          f"({x.shape[0] - nc} images), all {rows[0]['top1_all']:.4f} ({x.shape[0]})", flush=True)
    if args.methods:
        combos = [(1 - g / base_g, "-", m, "-", method_spec(m, g, args.extra, args.split))
                  for g in args.gmacs for m in args.methods]
    else:
        combos = [(red, alloc, crit, comp,
                   f"snp:target_gmacs={base_g * (1 - red):.6f},allocation={alloc},criterion={crit},compensate={comp}"
                   + ("," + args.extra if args.extra else ""))
                  for red in args.reductions for alloc in args.allocations
                  for crit in args.criteria for comp in args.compensate]
    from tqdm import tqdm

    for red, alloc, crit, comp, spec in tqdm(combos, desc="configs"):
        t0 = time.time()
        c = vitprune.compile(model, [spec], example_inputs=example, calibration=calib, progress=False)
        secs = c.report.passes[-1].get("seconds", time.time() - t0)
        lc = logits(c, x)
        p = lc.argmax(-1)
        row = dict(reduction=red, allocation=alloc, criterion=crit, compensate=comp, gmacs=c.report.gmacs_after,
                   top1_heldout=float((p[nc:] == ye).float().mean()), top1_all=float((p == y).float().mean()),
                   top1_calib=float((p[:nc] == y[:nc]).float().mean()),
                   agree_heldout=float((p[nc:] == p_all[nc:]).float().mean()),
                   agree_calib=float((p[:nc] == p_all[:nc]).float().mean()),
                   kl_calib=kl(l_all[:nc], lc[:nc]), kl_heldout=kl(l_all[nc:], lc[nc:]), seconds=secs, spec=spec)
        if "split" in c.report.passes[-1]:  # snp-tokens: the split it ran (chosen by split=none)
            row["split"] = c.report.passes[-1]["split"]
        if args.cv:
            row.update(cross_validate(model, spec, example, calib, l_all[:nc], y[:nc], args.cv_split))
        rows.append(row)
        tqdm.write(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    report(rows, args.png, args.model, nc, x.shape[0], args.time)


def method_spec(method: str, g: float, snp_extra: str = "", split: str = "0.5") -> str:
    """The pass spec of ``method`` at ``g`` GMACs (``snp_extra``: options of SNP and the compositions)."""
    extra = "," + snp_extra if snp_extra else ""
    if method in ("zero-tprune", "tome"):
        return f"{method}:target_gmacs={g:.6f}"
    if method == "snp":
        return f"snp:target_gmacs={g:.6f}{extra}"
    tokens = "tome" if method == "snp-tome" else "zero-tprune"
    return f"snp-tokens:target_gmacs={g:.6f},tokens={tokens},split={split}{extra}"


def cross_validate(model, spec, example, calib, l_ref, y, split="halves"):
    """Two-fold CV over the calibration images: prune with one half (same spec), measure top-1,
    agreement and KL on the other half; averaged over both directions. Unlike the calibration
    columns, the refit has not seen these images, and no held-out image is used. ``split``:
    ``halves`` (images 0..n/2-1 / the rest) or ``interleave`` (even / odd indices)."""
    import vitprune

    h = calib.shape[0] // 2
    if split == "interleave":
        parts = [(slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))]
    else:
        parts = [(slice(0, h), slice(h, None)), (slice(h, None), slice(0, h))]
    acc = agree = div = 0.0
    for fit, val in parts:
        c = vitprune.compile(model, [spec], example_inputs=example, calibration=calib[fit], progress=False)
        lc = logits(c, calib[val])
        acc += float((lc.argmax(-1) == y[val]).float().mean()) / 2
        agree += float((lc.argmax(-1) == l_ref[val].argmax(-1)).float().mean()) / 2
        div += kl(l_ref[val], lc) / 2
    return dict(top1_cv=acc, agree_cv=agree, kl_cv=div)


def report(rows, png, model_name, nc, total, seconds=False):
    """Markdown table (drops vs the unpruned row; ``seconds``: a column of the seconds in the pass)
    and a PNG of top-1 vs GMACs."""
    print()
    print(f"| GMACs reduction | allocation | criterion / method | recovery | GMACs | top-1 held-out ({total - nc}) | "
          f"drop (pt) | top-1 all ({total}) | agreement held-out | top-1 / agreement calib ({nc}) | KL calib / held-out | "
          f"top-1 / agreement / KL 2-fold CV calib | options |" + (" seconds |" if seconds else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if seconds else ""))
    for r in rows:
        drop = 100 * (rows[0]["top1_heldout"] - r["top1_heldout"])
        calib = (f"{100 * r['top1_calib']:.1f} / {100 * r['agree_calib']:.1f}" if "top1_calib" in r else "-")
        print(f"| {100 * r['reduction']:.0f} % | {r.get('allocation', 'uniform')} | {r['criterion']} | "
              f"{r['compensate']} | {r['gmacs']:.3f} | {100 * r['top1_heldout']:.1f} | {drop:.1f} | "
              f"{100 * r['top1_all']:.1f} | {100 * r['agree_heldout']:.1f} | {calib} | {_kl(r)} | {_cv(r)} | "
              f"{_options(r.get('spec', ''))}{_split(r)} |" + (f" {r.get('seconds', 0.0):.1f} |" if seconds else ""))
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4))
        def key(r):
            return (r.get("allocation", "uniform"), r["criterion"], r["compensate"], _options(r.get("spec", "")))

        for k in sorted({key(r) for r in rows[1:]}):
            pts = sorted((r for r in rows[1:] if key(r) == k), key=lambda r: r["gmacs"])
            alloc, crit, comp, opt = k
            ax.plot([r["gmacs"] for r in pts], [100 * r["top1_heldout"] for r in pts],
                    "o-" if alloc == "fisher" else "s--", label=f"{alloc}, {crit}, recovery={comp}"
                    + ("" if opt == "-" else f", {opt}"))
        ax.plot([rows[0]["gmacs"]], [100 * rows[0]["top1_heldout"]], "k*", ms=12, label="unpruned")
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel(f"top-1 % (held-out {total - nc} images)")
        ax.set_title(f"SNP zero-shot, {model_name} (calibration: first {nc} images)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")


def _kl(r) -> str:
    return f"{r['kl_calib']:.3f} / {r['kl_heldout']:.3f}" if "kl_calib" in r else "-"


def _cv(r) -> str:
    return f"{100 * r['top1_cv']:.1f} / {100 * r['agree_cv']:.1f} / {r['kl_cv']:.3f}" if "kl_cv" in r else "-"


def _split(r) -> str:
    """`` (split chosen: S)`` for a ``split=none`` composition row, else empty."""
    return f" (split chosen: {r['split']})" if "split" in r and "split=none" in r.get("spec", "") else ""


def _options(spec: str) -> str:
    """The spec's options other than target_gmacs/criterion/compensate (e.g. mix, sequential)."""
    opts = spec.partition(":")[2].split(",") if spec else []
    skip = ("target_gmacs", "criterion", "compensate", "allocation")
    return ",".join(o for o in opts if o.split("=")[0] not in skip) or "-"


def merge(paths, png, model_name="deit_tiny_patch16_224", nc=64, total=500):
    """Combine rows printed (JSON lines) or saved (--json) by several runs into one table/PNG."""
    base, rows = None, []
    for p in paths:
        text = open(p).read()
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = [json.loads(l) for l in text.splitlines() if l.startswith("{")]
        for r in items:
            if r["criterion"] == "-":
                base = r
            else:
                rows.append(r)
    rows.sort(key=lambda r: (r["reduction"], r.get("allocation", "uniform"), r["criterion"], r["compensate"],
                             r.get("spec", "")))
    report([base] + rows, png, model_name, nc, total)


if __name__ == "__main__":
    main()
