"""``vitprune search``: the Zero-TPrune schedule for one GMACs budget, chosen on calibration images.

A thin single-objective use of the sweep's schedule space (:func:`vitprune.sweep.suggest_zero_tprune`:
pruning-block layout, keep profile, per-layer weights scaled to the budget, S/I split; ALGORITHMS.md §1d),
searched by Optuna's TPE sampler: every trial is compiled and scored by top-1 agreement with the unpruned
model on the calibration images (top-1 against labels breaks ties). Trial 0 is the pass's own
uniform-keep-rate schedule for the budget, so the search never returns something worse than the default
on the calibration set. For the accuracy-vs-latency frontier over methods and budgets, measured on a
backend, use :func:`vitprune.sweep.sweep`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .errors import InvalidPassConfigError
from .ir.capture import capture
from .ir.flops import gmacs
from .ir.match import find_attention_sites
from .passes.base import PassContext
from .ir.cost import ViTDims
from .sweep import suggest_zero_tprune, zero_tprune_layouts


@torch.no_grad()
def _predict(fn, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    return torch.cat([fn(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])


def search_schedule(model: torch.nn.Module, data_dir: str, target_gmacs: float, trials: int = 20,
                    images: int = 100, seed: int = 0, candidate_blocks: Optional[Sequence[int]] = None,
                    progress: bool = True, base: Optional[dict] = None) -> dict:
    """Search a Zero-TPrune schedule for ``target_gmacs`` on calibration images (ALGORITHMS.md §1d).

    Args:
        model: the ViT to prune (timm / torchvision / Hugging Face); never mutated.
        data_dir: calibration folder (``<synset>_*.JPEG`` + ``synsets.txt``); the first
            ``images`` files are used, with timm's eval transform for the model.
        target_gmacs: budget in GMACs per image (±1 %).
        trials: schedules evaluated (trial 0 = the uniform keep-rate default).
        images: calibration images.
        seed: seed of Optuna's TPE sampler.
        candidate_blocks: the one layout of blocks after which pruning layers may sit (default: the
            layouts of :func:`vitprune.sweep.zero_tprune_layouts`).
        base: other ZeroTPrune options kept fixed (e.g. ``{"importance": "wpr"}``).

    Returns:
        ``{"passes": [best pass config], "config": the same config, "agreement": %, "top1": %,
        "gmacs": measured, "images": n, "target_gmacs", "trials": [{"config", "agreement", "top1", "gmacs"}]}``;
        ``passes`` makes the file a pass-list config (``vitprune eval --config``).

    Raises:
        InvalidPassConfigError: ``trials`` < 1, ``images`` < 1, or a budget no schedule reaches.
    """
    import optuna

    from .data import load_images
    from .models import eval_transform

    if trials < 1 or images < 1:
        raise InvalidPassConfigError(f"search: trials={trials} and images={images} must both be >= 1")
    base = dict(base or {})
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
    layouts = {"given": list(candidate_blocks)} if candidate_blocks is not None else zero_tprune_layouts(info.depth)
    ref = _predict(gm, x)

    def evaluate(p) -> dict:
        pruned = p(gm, PassContext(example_inputs=example))
        pred = _predict(pruned, x)
        return {"config": p.config(), "agreement": 100.0 * float((pred == ref).float().mean()),
                "top1": 100.0 * float((pred == labels).float().mean()) if labels is not None else None,
                "gmacs": gmacs(pruned, image_shape)}

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({"zt_layout": next(iter(layouts)), "zt_profile": "uniform",
                         "zt_rs_ratio": float(base.get("rs_ratio", 0.7))})
    fixed = {k: v for k, v in base.items() if k != "rs_ratio"}
    results = []
    bar = tqdm(total=trials, desc="schedule search", disable=not progress)
    attempts = 0
    while len(results) < trials and attempts < 20 * trials:
        attempts += 1
        trial = study.ask()
        try:
            p = suggest_zero_tprune(trial, target_gmacs, info, gm, sites, layouts, fixed=fixed)
        except InvalidPassConfigError:
            if not results:                                  # the default itself cannot reach the budget
                raise
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        r = evaluate(p)
        results.append(r)
        study.tell(trial, r["agreement"] + 1e-3 * (r["top1"] or 0.0))
        bar.update(1)
        bar.set_postfix(best=f"{max(t['agreement'] for t in results):.1f}%")
    bar.close()
    best = max(results, key=lambda r: (r["agreement"], r["top1"] or 0.0, -results.index(r)))
    return {"passes": [best["config"]], **best, "images": len(x), "target_gmacs": target_gmacs, "trials": results}


def _labels(data_dir: str, n: int) -> Optional[torch.Tensor]:
    """Labels of the first ``n`` images of the folder (same order as ``load_images``)."""
    from .data import ImageFolder

    ds = ImageFolder(data_dir, transform=lambda im: im, limit=n)
    return torch.tensor([y for _, y in ds.samples[:n]])
