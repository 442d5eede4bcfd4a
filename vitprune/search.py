"""Monte Carlo search of Zero-TPrune schedules for a GMACs budget (ALGORITHMS.md §1d recipe).

Zero-TPrune needs no training, so a schedule is judged by running the pruned model on a small
calibration set: every trial samples

1. per-layer removal counts: Dirichlet weights over the candidate pruning blocks, scaled
   (bisection on one factor) so that the analytic GMACs lands within 1 % below the budget;
2. the S-/I-stage split ``rs_ratio`` (uniform in [0, 1], step 0.05);

compiles it, and measures top-1 agreement with the unpruned model on the calibration images
(top-1 against labels breaks ties). Trial 0 is the pass's own uniform-keep-rate schedule for the
budget, so the search never returns something worse than the default on the calibration set.
The best configuration comes back as a JSON-friendly dict (``Pass.from_config(best["config"])``
rebuilds the pass). ALGORITHMS.md §1d: "sample per-layer removal counts (Dirichlet over layers
scaled to the FLOPs budget, ±1 %) and the S/I split per layer; evaluate top-1; keep the best".
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import InvalidPassConfigError
from .ir.flops import gmacs
from .ir.capture import capture
from .ir.match import find_attention_sites
from .passes.base import PassContext
from .ir.cost import ViTDims, bisect_budget
from .passes.tokens.zero_tprune import ZeroTPrune


def _counts_for(p_fixed: dict, weights: np.ndarray, blocks: list[int], info: ViTDims, gm, sites,
                target: float) -> Optional[ZeroTPrune]:
    """The schedule ``counts_i = round(s · w_i · M)`` whose analytic GMACs is the largest not above
    ``target`` (bisection on ``s``); None if the budget is out of reach for these weights."""
    m0 = info.tokens - info.prefix

    def make(s):
        m, counts = m0, []
        for w in weights:
            r = min(int(round(s * w * m0)), m - 1)
            counts.append(max(r, 0))
            m -= counts[-1]
        keep = [(b, c) for b, c in zip(blocks, counts) if c > 0]
        if not keep:
            return None, info.dense_gmacs
        p = ZeroTPrune(prune_blocks=[b for b, _ in keep], counts=[c for _, c in keep], **p_fixed)
        p.validate()
        return p, p.plan(gm, sites, info)[1]

    _, g_hi = make(1.0)
    if g_hi > target * 1.01:
        return None
    _, hi = bisect_budget(lambda s: make(s)[1], 0.0, 1.0, target, iters=30, increasing=False)
    p, g = make(hi)
    return p if p is not None and abs(g - target) <= 0.01 * target else None


@torch.no_grad()
def _predict(fn, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    return torch.cat([fn(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])


def search_schedule(model: torch.nn.Module, data_dir: str, target_gmacs: float, trials: int = 20,
                    images: int = 100, seed: int = 0, candidate_blocks: Optional[Sequence[int]] = None,
                    alpha: float = 1.0, progress: bool = True, base: Optional[dict] = None) -> dict:
    """Monte Carlo search of a Zero-TPrune schedule for ``target_gmacs`` (ALGORITHMS.md §1d).

    Args:
        model: the ViT to prune (timm / torchvision / Hugging Face); never mutated.
        data_dir: calibration folder (``<synset>_*.JPEG`` + ``synsets.txt``); the first
            ``images`` files are used, with timm's eval transform for the model.
        target_gmacs: budget in GMACs per image (±1 %).
        trials: schedules evaluated (trial 0 = the uniform keep-rate default).
        images: calibration images.
        seed: seed of the sampler (NumPy ``default_rng``).
        candidate_blocks: blocks after which a pruning layer may sit (default ``1 .. depth-2``).
        alpha: Dirichlet concentration (1 = uniform over the simplex; large = near-equal counts).
        base: other ZeroTPrune options kept fixed (e.g. ``{"importance": "wpr"}``).

    Returns:
        ``{"config": best pass config, "agreement": %, "top1": %, "gmacs": measured, "images": n,
        "target_gmacs", "trials": [{"config", "agreement", "top1", "gmacs"}, ...]}``.

    Raises:
        InvalidPassConfigError: ``trials`` < 1, ``images`` < 1, or a budget no schedule reaches.
    """
    from .data import load_images
    from .models import eval_transform

    if trials < 1 or images < 1:
        raise InvalidPassConfigError(f"search: trials={trials} and images={images} must both be >= 1")
    base = dict(base or {})
    rng = np.random.default_rng(seed)
    x = load_images(data_dir, eval_transform(model), images)
    labels = _labels(data_dir, len(x))
    example = (x[:2],)
    gm = capture(model, example)
    sites = find_attention_sites(gm)
    image_shape = tuple(x.shape[1:])
    info = ViTDims.from_graph(gm, sites, image_shape)
    if not 0 < target_gmacs < info.dense_gmacs:
        raise InvalidPassConfigError(
            f"search: target_gmacs={target_gmacs} outside (0, {info.dense_gmacs:.4f}) (the unpruned model's GMACs)")
    blocks = list(candidate_blocks) if candidate_blocks is not None else list(range(1, info.depth - 1))
    ref = _predict(gm, x)

    def evaluate(p: ZeroTPrune) -> dict:
        pruned = p(gm, PassContext(example_inputs=example, progress=False))
        pred = _predict(pruned, x)
        return {"config": p.config(), "agreement": 100.0 * float((pred == ref).float().mean()),
                "top1": 100.0 * float((pred == labels).float().mean()) if labels is not None else None,
                "gmacs": gmacs(pruned, image_shape)}

    results = []
    bar = tqdm(total=trials, desc="schedule search", disable=not progress)
    default = ZeroTPrune(target_gmacs=float(target_gmacs), **base)
    default.validate()
    results.append(evaluate(default))
    bar.update(1)
    attempts = 0
    while len(results) < trials and attempts < 20 * trials:
        attempts += 1
        w = rng.dirichlet(np.full(len(blocks), alpha))
        fixed = {**base, "rs_ratio": float(np.round(rng.uniform(0, 1) / 0.05) * 0.05)}
        p = _counts_for(fixed, w, blocks, info, gm, sites, target_gmacs)
        if p is None:
            continue
        results.append(evaluate(p))
        bar.update(1)
        bar.set_postfix(best=f"{max(r['agreement'] for r in results):.1f}%")
    bar.close()
    best = max(results, key=lambda r: (r["agreement"], r["top1"] or 0.0, -results.index(r)))
    return {**best, "images": len(x), "target_gmacs": target_gmacs, "trials": results}


def _labels(data_dir: str, n: int) -> Optional[torch.Tensor]:
    """Labels of the first ``n`` images of the folder (same order as ``load_images``)."""
    from .data import ImageFolder

    ds = ImageFolder(data_dir, transform=lambda im: im, limit=n)
    return torch.tensor([y for _, y in ds.samples[:n]])
