"""Compile a real DeiT-Tiny with vitprune and compare it with the original on real images.

    python examples/quickstart.py [--weights ../shared/models/deit_tiny_patch16_224.safetensors]
                                  [--data ../shared/data/imagenet-sample] [--pass SPEC]...
"""

import argparse

import torch

import vitprune
from vitprune.eval import ImageFolder, evaluate, make_loader
from vitprune.models import eval_transform, load_model

p = argparse.ArgumentParser()
p.add_argument("--weights", default="../shared/models/deit_tiny_patch16_224.safetensors")
p.add_argument("--data", default="../shared/data/imagenet-sample")
p.add_argument("--pass", dest="passes", action="append", default=None)
p.add_argument("--limit", type=int, default=100)
args = p.parse_args()

model = load_model("deit_tiny_patch16_224", args.weights)
compiled = vitprune.compile(model, passes=args.passes or ["explicit-attention"],
                            example_inputs=torch.randn(1, 3, 224, 224))
print(compiled.report)
loader = make_loader(ImageFolder(args.data, eval_transform(model), limit=args.limit), batch_size=25)
print(evaluate(compiled, loader, reference=model))
compiled.export("/tmp/deit_tiny_vitprune.pt2")
print("exported /tmp/deit_tiny_vitprune.pt2; reload with vitprune.load(path)")
