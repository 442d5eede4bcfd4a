"""Accuracy vs GMACs of SNP on a real model, no fine-tuning (issue 4 "Done when").

Calibrates on the first ``--calib-images`` images of the folder (sorted by file name) and reports
top-1 on the remaining images and, for reference, on all of them. For each GMACs reduction it
compares SNP's scores and the activation-aware scores, with and without least-squares
recovery. Prints a markdown table and writes a PNG.

    PYTHONPATH=. python benchmarks/snp_accuracy.py --reductions 0.1 0.2 0.3 --png docs/snp_accuracy.png
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def load_folder(folder: str, transform):
    """Images ``<synset>_<name>.JPEG`` and labels (line of the synset in synsets.txt)."""
    from PIL import Image

    synsets = [l.split()[0] for l in open(os.path.join(folder, "synsets.txt")) if l.strip()]
    index = {s: i for i, s in enumerate(synsets)}
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpeg", ".jpg", ".png")))
    xs, ys = [], []
    for f in files:
        with Image.open(os.path.join(folder, f)) as im:
            xs.append(transform(im.convert("RGB")))
        ys.append(index[f.split("_")[0]])
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def predict(fn, x, bs=50):
    return torch.cat([fn(x[i:i + bs]).argmax(-1) for i in range(0, x.shape[0], bs)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--weights", default="../shared/models/deit_tiny_patch16_224.safetensors")
    ap.add_argument("--data", default="../shared/data/imagenet-sample")
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--reductions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--criteria", nargs="+", default=["snp", "activation"])
    ap.add_argument("--compensate", nargs="+", default=["false", "true"])
    ap.add_argument("--extra", default="", help="extra snp options, e.g. sequential=false")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", default="docs/snp_accuracy.png")
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", nargs="+", default=None, help="only merge earlier --json/log outputs")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.png, args.model, args.calib_images)
    torch.set_num_threads(args.threads)

    import safetensors.torch
    import timm

    import vitprune

    model = timm.create_model(args.model)
    model.load_state_dict(safetensors.torch.load_file(args.weights))
    model.eval()
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    x, y = load_folder(args.data, tf)
    nc = args.calib_images
    calib, xe, ye = x[:nc], x[nc:], y[nc:]
    example = x[:2]

    base = vitprune.compile(model, [], example_inputs=example)
    p_all = predict(base, x)
    base_g = base.report.gmacs_before
    rows = [dict(reduction=0.0, criterion="-", compensate="-", gmacs=base_g,
                 top1_heldout=float((p_all[nc:] == ye).float().mean()), top1_all=float((p_all == y).float().mean()),
                 agree_heldout=1.0, seconds=0.0)]
    print(json.dumps(rows[0]), flush=True)
    print(f"unpruned: {base_g:.3f} GMACs, top-1 held-out {rows[0]['top1_heldout']:.4f} "
          f"({x.shape[0] - nc} images), all {rows[0]['top1_all']:.4f} ({x.shape[0]})", flush=True)
    for red in args.reductions:
        for crit in args.criteria:
            for comp in args.compensate:
                spec = f"snp:target_gmacs={base_g * (1 - red):.6f},criterion={crit},compensate={comp}"
                if args.extra:
                    spec += "," + args.extra
                t0 = time.time()
                c = vitprune.compile(model, [spec], example_inputs=example, calibration=calib, progress=False)
                secs = time.time() - t0
                p = predict(c, x)
                row = dict(reduction=red, criterion=crit, compensate=comp, gmacs=c.report.gmacs_after,
                           top1_heldout=float((p[nc:] == ye).float().mean()), top1_all=float((p == y).float().mean()),
                           agree_heldout=float((p[nc:] == p_all[nc:]).float().mean()), seconds=secs, spec=spec)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    report(rows, args.png, args.model, nc, x.shape[0])


def report(rows, png, model_name, nc, total):
    """Markdown table (drops vs the unpruned row) and a PNG of top-1 vs GMACs."""
    print()
    print(f"| GMACs reduction | criterion | recovery | GMACs | top-1 held-out ({total - nc}) | drop (pt) | "
          f"top-1 all ({total}) | agreement | options |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        drop = 100 * (rows[0]["top1_heldout"] - r["top1_heldout"])
        print(f"| {100 * r['reduction']:.0f} % | {r['criterion']} | {r['compensate']} | {r['gmacs']:.3f} | "
              f"{100 * r['top1_heldout']:.1f} | {drop:.1f} | {100 * r['top1_all']:.1f} | {100 * r['agree_heldout']:.1f} | "
              f"{_options(r.get('spec', ''))} |")
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4))
        combos = sorted({(r["criterion"], r["compensate"], _options(r.get("spec", ""))) for r in rows[1:]})
        for crit, comp, opt in combos:
            pts = sorted((r for r in rows[1:] if (r["criterion"], r["compensate"], _options(r.get("spec", "")))
                          == (crit, comp, opt)), key=lambda r: r["gmacs"])
            ax.plot([r["gmacs"] for r in pts], [100 * r["top1_heldout"] for r in pts], "o-",
                    label=f"{crit}, recovery={comp}, {opt}")
        ax.plot([rows[0]["gmacs"]], [100 * rows[0]["top1_heldout"]], "k*", ms=12, label="unpruned")
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel(f"top-1 % (held-out {total - nc} images)")
        ax.set_title(f"SNP zero-shot, {model_name} (calibration: first {nc} images)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")


def _options(spec: str) -> str:
    """The spec's options other than target_gmacs/criterion/compensate (e.g. mix, sequential)."""
    opts = spec.partition(":")[2].split(",") if spec else []
    return ",".join(o for o in opts if o.split("=")[0] not in ("target_gmacs", "criterion", "compensate")) or "-"


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
    rows.sort(key=lambda r: (r["reduction"], r["criterion"], r["compensate"], r.get("spec", "")))
    report([base] + rows, png, model_name, nc, total)


if __name__ == "__main__":
    main()
