"""Released SNP configurations as kept widths (ALGORITHMS.md §2c table, computed from the
per-layer ratio JSONs of Nota-NetsPresso/SNP). Widths are per head for q/k and v.

Each preset also records the architecture it belongs to; applying it to another one is an
error (:class:`vitprune.errors.InvalidPassConfigError`).
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "deit-t": dict(arch=dict(depth=12, embed_dim=192, num_heads=3, head_dim=64, mlp=768), embed=153,
                   qk=[39, 39, 39, 32, 26, 32, 26, 20, 20, 20, 20, 20],
                   v=[51, 51, 38, 31, 38, 19, 38, 38, 31, 25, 19, 19],
                   mlp=[614] * 5 + [460, 537, 537, 614, 537, 460, 383], gmacs=0.64),
    "deit-s": dict(arch=dict(depth=12, embed_dim=384, num_heads=6, head_dim=64, mlp=1536), embed=307,
                   qk=[25] * 7 + [13] * 5,
                   v=[51, 38, 38, 38, 31, 31, 31, 25, 19, 19, 12, 12],
                   mlp=[1228] * 5 + [1075, 1228, 921, 921, 921, 307, 307], gmacs=2.04),
    "deit-s-small": dict(arch=dict(depth=12, embed_dim=384, num_heads=6, head_dim=64, mlp=1536), embed=345,
                         qk=[26, 20, 20] + [13] * 9,
                         v=[12, 19, 19] + [12] * 9,
                         mlp=[1382, 1075, 1075] + [307] * 9, gmacs=1.27),
    # DeiT-B widths are +-1 (rounding of 0.7 * 64 = 44.8 removed), ALGORITHMS.md §2c
    "deit-b": dict(arch=dict(depth=12, embed_dim=768, num_heads=12, head_dim=64, mlp=3072), embed=538,
                   qk=[19, 19, 19, 19, 19, 26, 19, 19, 19, 19, 26, 19],
                   v=[19, 19, 19, 19, 19, 26, 19, 26, 19, 19, 38, 32],
                   mlp=[2150, 1229, 2150, 2150, 2150, 1536, 2150, 1843, 2150, 1843, 1843, 922], gmacs=6.32),
}


def preset_name(name: str) -> str:
    """Normalise ``snp-deit-s`` / ``DeiT-S`` / ``deit_s`` to the key ``deit-s``."""
    key = name.strip().lower().replace("_", "-")
    return key[4:] if key.startswith("snp-") else key
