"""Compile a real DeiT-Tiny with vitprune and compare it with the original on real images.

    python examples/quickstart.py [--weights ../shared/models/deit_tiny_patch16_224.safetensors]
                                  [--data ../shared/data/imagenet-sample] [--pass SPEC]... [--out m.pt2]

Default paths are relative to the repository, so it runs from any folder.
"""

import argparse
import os

import torch

import vitprune
from vitprune.eval import ImageFolder, evaluate, make_loader
from vitprune.models import eval_transform, load_model

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")

p = argparse.ArgumentParser()
p.add_argument("--weights", default=os.path.join(SHARED, "models", "deit_tiny_patch16_224.safetensors"))
p.add_argument("--data", default=os.path.join(SHARED, "data", "imagenet-sample"))
p.add_argument("--pass", dest="passes", action="append", default=None)
p.add_argument("--limit", type=int, default=100)
p.add_argument("--out", default="deit_tiny_vitprune.pt2", help="where to export (default: the current folder)")
args = p.parse_args()

model = load_model("deit_tiny_patch16_224", args.weights)
compiled = vitprune.compile(model, passes=args.passes or ["explicit-attention"],
                            example_inputs=torch.randn(1, 3, 224, 224))
print(compiled.report)
loader = make_loader(ImageFolder(args.data, eval_transform(model), limit=args.limit), batch_size=25)
print(evaluate(compiled, loader, reference=model))
compiled.export(args.out)
reloaded = vitprune.load(args.out, trust=True)  # a .pt2 can run code when loaded: trust only files you made
print(f"exported {args.out}; reloaded it: max logit difference "
      f"{(reloaded(torch.zeros(1, 3, 224, 224)) - compiled(torch.zeros(1, 3, 224, 224))).abs().max():.1e}")
