"""GPU checks, ready to run on a machine with an NVIDIA GPU (prints "no CUDA device" and exits 0 elsewhere).

    python benchmarks/gpu_check.py [--weights ../shared/models/deit_tiny_patch16_224.safetensors]
        [--data ../shared/data/imagenet-sample] [--images 500] [--trials 64] [--arch sm_90] [--out gpu_check.json]

1. builds DeiT-T unpruned and with ``zero-tprune:target_gmacs=0.96`` for CUDA with vitprune's TVM
   backend (dlight schedules, with the per-function fallback of backends/tvm/cuda_schedule.py), loads
   and runs them on the GPU and compares them with torch CUDA eager of the same graph on the images:
   top-1 identical on every image, and the max abs logit difference;
2. tunes the unpruned graph with MetaSchedule on the GPU with a small budget (TVM's own
   ``static_shape_tuning`` pipeline, measured on this GPU);
3. prints latency at batch 1 and 32 for torch eager, torch.compile, onnxruntime CUDA (if installed),
   TVM untuned and TVM tuned, as ratios to torch eager (median of repeats, CUDA-synchronised).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _has_cuda() -> str | None:
    """None if torch and TVM both see a CUDA GPU, else why not."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    try:
        import tvm

        if not tvm.cuda(0).exist:
            return "TVM sees no CUDA GPU"
    except Exception as exc:  # noqa: BLE001
        return f"TVM cannot use CUDA here ({type(exc).__name__})"
    return None


def _median_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000.0 * (time.perf_counter() - t0))
    return float(np.median(times))


def _tvm_vm(gm, x, target, tuning_dir=None):
    """(VM, device) of ``gm`` built for CUDA at the shape of ``x``, optionally with a MetaSchedule database."""
    import tvm
    from tvm import relax

    from vitprune.backends.tvm.backend import build, import_relax

    mod = import_relax(gm, (x.cpu(),))
    ex = build(mod, target, tuning_dir)
    dev = tvm.cuda(0)
    return relax.VirtualMachine(ex, dev), dev


def _tvm_call(vm, dev, x):
    import tvm

    inp = tvm.runtime.tensor(x.detach().cpu().numpy(), dev)

    def run():
        out = vm["main"](inp)
        return out if hasattr(out, "numpy") else out[0]
    return run


def _compare(vm, dev, gm, loader, batch):
    """Top-1 agreement and max abs logit difference of the TVM CUDA module against torch CUDA eager."""
    same = n = 0
    worst = 0.0
    gm_cuda = gm.to("cuda")
    for x, _, _ in loader:
        if not len(x):
            continue
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch]
            if len(chunk) < batch:
                chunk = torch.cat([chunk, torch.zeros((batch - len(chunk),) + chunk.shape[1:])])
            k = min(batch, len(x) - i)
            out = torch.from_numpy(_tvm_call(vm, dev, chunk)().numpy())[:k]
            with torch.no_grad():
                ref = gm_cuda(chunk.cuda()).cpu()[:k]
            same += int((out.argmax(-1) == ref.argmax(-1)).sum())
            n += k
            worst = max(worst, float((out - ref).abs().max()))
    gm.to("cpu")
    return same, n, worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="../shared/models/deit_tiny_patch16_224.safetensors")
    ap.add_argument("--data", default="../shared/data/imagenet-sample")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--trials", type=int, default=64, help="MetaSchedule trials in total for the GPU tune")
    ap.add_argument("--arch", default=None, help="CUDA arch (default: this GPU's, e.g. sm_90)")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args(argv)

    why = _has_cuda()
    if why:
        print(f"gpu_check: no CUDA device ({why}); nothing to check on this machine. Run it on a machine "
              f"with an NVIDIA GPU and a CUDA-enabled torch and TVM.")
        return 0

    import vitprune
    from vitprune.backends.tvm.targets import resolve_target
    from vitprune.data import ImageFolder, make_loader
    from vitprune.models import eval_transform, load_model

    major, minor = torch.cuda.get_device_capability(0)
    arch = args.arch or f"sm_{major}{minor}"
    target = resolve_target("cuda", arch=arch)
    model = load_model("deit_tiny_patch16_224", args.weights)
    loader = make_loader(ImageFolder(args.data, eval_transform(model), limit=args.images), 50)
    print(f"GPU: {torch.cuda.get_device_name(0)} ({arch}); {args.images} images from {args.data}")

    results = {"gpu": torch.cuda.get_device_name(0), "arch": arch, "checks": [], "latency": []}
    graphs = {}
    for label, passes in (("unpruned", []), ("zero-tprune:target_gmacs=0.96", ["zero-tprune:target_gmacs=0.96"])):
        c = vitprune.compile(model, passes=passes, example_inputs=torch.randn(1, 3, 224, 224), progress=False)
        graphs[label] = c.graph_module
        vm, dev = _tvm_vm(c.graph_module, torch.randn(1, 3, 224, 224), target)
        same, n, worst = _compare(vm, dev, c.graph_module, loader, 1)
        results["checks"].append({"graph": label, "top1_same": same, "images": n, "max_abs_logit_diff": worst})
        print(f"{label}: TVM CUDA vs torch CUDA eager: top-1 same on {same}/{n}, max abs logit diff {worst:.2e}")

    import tvm
    from tvm import relax

    work_dir = os.path.abspath("gpu_check_tuning")
    from vitprune.backends.tvm.backend import import_relax

    t0 = time.time()
    mod = import_relax(graphs["unpruned"], (torch.randn(1, 3, 224, 224),))
    with target:
        relax.get_pipeline("static_shape_tuning", total_trials=args.trials, target=target, work_dir=work_dir)(mod)
    print(f"MetaSchedule tuned the unpruned graph on the GPU: {args.trials} trials in {time.time() - t0:.0f} s")

    for batch in (1, 32):
        x = torch.randn(batch, 3, 224, 224)
        gm = graphs["unpruned"].to("cuda").eval()
        xc = x.cuda()
        row = {"batch": batch}
        with torch.no_grad():
            row["torch_eager_ms"] = _median_ms(lambda: gm(xc))
            try:
                compiled = torch.compile(gm)
                row["torch_compile_ms"] = _median_ms(lambda: compiled(xc), warmup=5)
            except Exception as exc:  # noqa: BLE001
                print(f"torch.compile failed: {type(exc).__name__}")
        gm.to("cpu")
        try:
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                path = f"gpu_check_b{batch}.onnx"
                torch.onnx.export(graphs["unpruned"], (x,), path, dynamo=False, opset_version=17)
                sess = ort.InferenceSession(path, providers=["CUDAExecutionProvider"])
                feed = {sess.get_inputs()[0].name: x.numpy()}
                row["onnxruntime_cuda_ms"] = _median_ms(lambda: sess.run(None, feed))
        except ImportError:
            pass
        for name, tdir in (("tvm_untuned_ms", None), ("tvm_tuned_ms", work_dir)):
            with target:
                base = import_relax(graphs["unpruned"], (x,))
                if tdir:
                    base = relax.get_pipeline("static_shape_tuning", total_trials=0, target=target, work_dir=tdir)(base)
                ex = tvm.compile(base, target=target)
            vm = relax.VirtualMachine(ex, tvm.cuda(0))
            row[name] = _median_ms(_tvm_call(vm, tvm.cuda(0), x))
        results["latency"].append(row)

    print("\n| batch | " + " | ".join(k[:-3] for k in results["latency"][0] if k != "batch") + " |")
    for row in results["latency"]:
        base = row["torch_eager_ms"]
        cells = [f"{v:.2f} ms ({base / v:.2f}x)" for k, v in row.items() if k != "batch"]
        print(f"| {row['batch']} | " + " | ".join(cells) + " |")
    print("(ratio = torch eager latency / this latency; > 1 is faster than torch eager)")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    ok = all(c["top1_same"] == c["images"] for c in results["checks"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
