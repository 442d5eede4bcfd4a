"""Kept-token maps: which patches each pruning / merging layer kept, drawn on the image.

:func:`token_groups` runs a pruned GraphModule once (``torch.fx.Interpreter``) and reads the
selection values that token-reduction passes tag (:mod:`vitprune.ir.tags`): kept indices for
pruning (Zero-TPrune ``mode=prune``), the packed matching for merging (ToMe) and the packed
``kept | src | dst`` of Zero-TPrune's merge variant. Composing them layer by layer
gives, for every original token, the token that stands for it after each layer (or −1 once it is
dropped). :func:`draw_kept_tokens` draws one panel per layer with matplotlib: dropped patches
greyed out, patches merged into one token filled with that group's colour (chosen by the group's
lowest patch index, so a group that survives to the next panel keeps its colour).
"""

from __future__ import annotations


from typing import Optional, Sequence

import numpy as np
import torch
from torch.fx import GraphModule

from ..ir.values import node_values
from ..ir.tags import decode_selection, token_select_outputs


@torch.no_grad()
def token_groups(module, x: torch.Tensor) -> list[dict]:
    """For each tagged token-selection layer, where every original token went.

    Args:
        module: a GraphModule after token passes, or a ``CompiledModule`` (its ``graph_module``).
        x: ``[B, 3, H, W]`` images.

    Returns:
        per layer, in graph order: ``{"block": int, "kind": "prune"|"tome"|"merge", "group": [B, N0]
        int64}`` where ``group[b, t]`` is the position, in the layer's output sequence, of the
        token that original token ``t`` now belongs to, or −1 if it was dropped. Tokens sharing a
        group value were merged. Empty if the graph has no tagged layer.

    In a merge layer (``"tome"``, ``"merge"``) ``src``/``dst`` index the layer's input sequence;
    a source joins its destination's group. Zero-TPrune's I-stage may then drop a destination
    (``dst`` not in ``kept``): the destination and every source merged into it are dropped (−1),
    as the merged token is not gathered.
    """
    gm: GraphModule = getattr(module, "graph_module", module)
    wanted = token_select_outputs(gm)
    if not wanted:
        return []
    values = node_values(gm, (x,), {n for n, _ in wanted})
    n0 = wanted[0][1]["tokens_in"]
    slot = torch.arange(n0).expand(x.shape[0], n0).clone()          # current position of each original
    layers = []
    for node, tag in wanted:
        val = values[node]
        n_in = tag["tokens_in"]
        kept, src, dst = decode_selection(tag, val)
        dest = torch.arange(n_in).expand(x.shape[0], n_in).clone()      # current token -> token it joins
        dest.scatter_(1, src, dst)
        eq = dest.unsqueeze(-1) == kept.unsqueeze(1)                      # [B, n_in, K]
        pos = torch.where(eq.any(-1), eq.to(torch.int64).argmax(-1), torch.full_like(dest, -1))
        alive = slot >= 0
        slot = torch.where(alive, torch.gather(pos, 1, slot.clamp_min(0)), slot)
        layers.append({"block": tag["block"], "kind": tag["kind"], "group": slot.clone()})
    return layers


def patch_grid(num_tokens: int, num_prefix: int) -> int:
    """Side of the square patch grid for ``num_tokens`` tokens of which ``num_prefix`` are prefix."""
    side = int(round((num_tokens - num_prefix) ** 0.5))
    if side * side != num_tokens - num_prefix:
        raise ValueError(f"{num_tokens - num_prefix} patch tokens do not form a square grid; pass num_prefix")
    return side


def layer_label(patches: np.ndarray, kind: str) -> str:
    """Panel caption from one sample's patch groups ``[M]`` (prefix tokens excluded).

    Pruning (``"prune"``): ``"K/M patches kept"``. Merging (``"tome"``, ``"merge"``):
    ``"K tokens (M merged, P dropped)"``: ``K`` patch tokens left, ``M`` patches merged into
    another one (alive patches minus tokens), ``P`` patches dropped."""
    alive = patches[patches >= 0]
    if kind not in ("tome", "merge"):
        return f"{len(alive)}/{len(patches)} patches kept"
    tokens = len(np.unique(alive))
    return f"{tokens} tokens ({len(alive) - tokens} merged, {len(patches) - len(alive)} dropped)"


def colour_keys(patches: np.ndarray) -> np.ndarray:
    """``[M]`` group of each patch (−1: dropped) -> ``[M]`` colour key: the lowest patch index of the
    patch's group (−1 if dropped). Group ids are positions in one layer's output and change from
    layer to layer; the key depends only on the group's members, so a group keeps its colour."""
    keys = np.full(len(patches), -1, dtype=np.int64)
    first: dict = {}
    for p, g in enumerate(patches):
        if g >= 0:
            keys[p] = first.setdefault(int(g), p)
    return keys


def draw_kept_tokens(image: np.ndarray, layers: Sequence[dict], out: str, num_prefix: int = 1,
                     sample: int = 0, title: Optional[str] = None, cols: Optional[int] = None) -> str:
    """Draw the kept-token map of one image and save it as a PNG.

    Args:
        image: ``[H, W, 3]`` float in [0, 1] (the network's input, un-normalised).
        layers: from :func:`token_groups`.
        out: PNG path.
        num_prefix: prefix tokens (CLS, dist) before the patches.
        sample: which batch element ``layers`` describe.

    Returns:
        ``out``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[:2]
    panels = [("input", None)] + [(f"after block {L['block']}", L) for L in layers]
    cols = cols or min(len(panels), 5)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols, 3.9 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    palette = rng.uniform(0.15, 1.0, size=(4096, 3))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, L) in zip(axes.flat, panels):
        if L is None:
            ax.imshow(image)
            ax.set_title(name, fontsize=11)
            continue
        group = L["group"][sample].numpy()
        patches = group[num_prefix:]
        side = int(round(len(patches) ** 0.5))
        ph, pw = h // side, w // side
        img = image.copy()
        counts = np.bincount(patches[patches >= 0], minlength=1)
        grey = np.array([0.55, 0.55, 0.55])
        keys = colour_keys(patches)
        for p, g in enumerate(patches):
            r, c = divmod(p, side)
            sl = (slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw))
            if g < 0:
                img[sl] = 0.25 * img[sl] + 0.75 * grey
            elif counts[g] > 1:
                img[sl] = 0.45 * img[sl] + 0.55 * palette[keys[p] % len(palette)]
        ax.imshow(img)
        ax.set_title(f"{name}\n{layer_label(patches, L['kind'])}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if rows > 1 else 0.93) if title else None)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def unnormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``[3, H, W]`` normalised image tensor -> ``[H, W, 3]`` float array in [0, 1]."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def kept_token_map(compiled, x: torch.Tensor, out: str, mean: Sequence[float] = (0.485, 0.456, 0.406),
                   std: Sequence[float] = (0.229, 0.224, 0.225), title: Optional[str] = None) -> dict:
    """Run a compiled (token-reduced) model on one image and draw its kept-token map.

    Args:
        compiled: a ``CompiledModule`` (or a GraphModule) after token passes.
        x: ``[1, 3, H, W]`` the transformed image.
        out: PNG path.
        mean, std: the normalisation of ``x`` (to draw the image as the network saw it).
        title: figure title; default: the passes and GMACs of ``compiled``.

    Returns:
        ``{"out": PNG path, "layers": [{"block", "kind", "group": [N0] (see :func:`token_groups`),
        "tokens": tokens left}], "gmacs": float}``.
    """
    from ..ir.match import find_attention_sites

    gm = getattr(compiled, "graph_module", compiled)
    report = getattr(compiled, "report", None)
    prefix = find_attention_sites(gm)[0].num_prefix_tokens
    layers = token_groups(gm, x)
    gm_after = report.gmacs_after if report is not None else None
    if title is None:
        specs = " ".join(p.spec() for p in getattr(compiled, "passes", []))
        title = f"{specs}: {gm_after:.3f} GMACs" if gm_after is not None else specs
    draw_kept_tokens(unnormalise(x[0], mean, std), layers, out, num_prefix=prefix, title=title)
    return {"out": out, "gmacs": gm_after,
            "layers": [{"block": L["block"], "kind": L["kind"], "group": L["group"][0].tolist(),
                        "tokens": int(len(torch.unique(L["group"][0][L["group"][0] >= 0])))} for L in layers]}
