"""Benchmark: the Fashion-MNIST reference component's training loop on a CUDA GPU, against peers
trained in the same process on the same data and recipe.

Variants (each RECIPE.md's recipe: FashionCNN, 5 epochs, batch 128, one-cycle AdamW at 5e-3, seed 0,
`flywheel.component.loop.fit` with no callback, so nothing outside the process is touched):

* `loop`: the shipped loop on `cuda` (bf16 autocast where the GPU has bf16, fp16 with gradient
  scaling where it has not);
* `fp32`: the same loop with autocast off (what autocast buys, and what it costs in accuracy);
* `peer`: another version of loop.py given by `--peer-loop PATH`, on `cuda`, e.g. the one before
  a change: `git show HEAD~1:src/flywheel/component/loop.py > /tmp/loop_before.py`;
* `cpu`: the shipped loop on this machine's CPU for `--cpu-epochs` epochs (a node without a GPU);
* `batch-N`: the shipped loop on `cuda` with N images per step instead of 128 (`--batch-sizes`; the
  recipe's learning rate unchanged), since a launch-bound step gets faster per epoch with fewer steps.

A one-epoch warm-up on the GPU comes first (CUDA context, cuDNN's kernel choice, the first loads of
each kernel); `loop` and `fp32` run twice, interleaved, so the spread of one variant is printed
beside the differences between them. Read per variant: seconds per epoch (the optimisation loop alone, as
`fit()` counts `train_seconds`) and the test accuracy on the frozen 10,000 images. Printed: a table
and each variant's seconds per epoch over `loop`'s.

    python benchmarks/gpu_training.py --data-dir DIR [--peer-loop FILE] [--cpu-epochs 1]

The last stdout line is `BENCH_JSON {...}` (also written to --json-out).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "examples" / "fashion-mnist"))
from bench_io import emit  # noqa: E402 - benchmarks/ is the script's own directory


def load_loop(path: Path):
    """A loop.py from `path` as its own module (registered first: its dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location("flywheel_peer_loop", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_variant(loop, splits, device: str, epochs: int, *, autocast: bool = True, batch_size: int = 128) -> dict:
    import torch
    from model import FashionCNN

    from flywheel.core.evaluate import predict

    cfg = loop.FitConfig(epochs=epochs, batch_size=batch_size, lr=5e-3, seed=0)
    amp = loop._amp
    if not autocast:
        loop._amp = lambda _device: (nullcontext, None)  # the fp32 peer: the same loop, autocast off
    try:
        loop.seed_everything(0)
        fitted = loop.fit(cfg, splits, torch.device(device), model=FashionCNN(len(splits.class_names)))
    finally:
        loop._amp = amp
    logits = predict(fitted.model, splits.test.images, splits, device=device)
    return {"epoch_seconds": fitted.train_seconds / epochs,
            "test_accuracy": float((logits.argmax(1) == splits.test.labels).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=None, help="folder with the Fashion-MNIST idx files")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per GPU variant (RECIPE.md: 5)")
    ap.add_argument("--cpu-epochs", type=int, default=1, help="epochs of the CPU variant (0: skip it)")
    ap.add_argument("--peer-loop", type=Path, default=None, help="another loop.py to time on the GPU")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[],
                    help="also time the shipped loop at these batch sizes (variants batch-N)")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    import torch

    from flywheel.component import loop
    from flywheel.core.data import load_splits

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch: this benchmark times the GPU path")
    splits = load_splits("fashion-mnist", args.data_dir, seed=0)
    gpu = torch.cuda.get_device_name(0)
    print(f"{gpu}, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    run_variant(loop, splits, "cuda", 1)  # warm-up, not reported

    plan = [("loop", loop, "cuda", True, 128)]
    if args.peer_loop:
        plan.append(("peer", load_loop(args.peer_loop), "cuda", True, 128))
    plan += [("fp32", loop, "cuda", False, 128), ("loop", loop, "cuda", True, 128), ("fp32", loop, "cuda", False, 128)]
    plan += [(f"batch-{b}", loop, "cuda", True, b) for b in args.batch_sizes]
    rows: dict[str, list[dict]] = {}
    for name, module, device, autocast, batch_size in plan:
        row = run_variant(module, splits, device, args.epochs, autocast=autocast, batch_size=batch_size)
        rows.setdefault(name, []).append(row)
        print(f"  {name:10s} {row['epoch_seconds']:.3f} s/epoch, test accuracy {row['test_accuracy']:.4f}", flush=True)
    if args.cpu_epochs:
        row = run_variant(loop, splits, "cpu", args.cpu_epochs)
        rows["cpu"] = [row]
        print(f"  cpu   {row['epoch_seconds']:.3f} s/epoch, test accuracy {row['test_accuracy']:.4f} "
              f"after {args.cpu_epochs} epoch(s)", flush=True)

    base = statistics.median(r["epoch_seconds"] for r in rows["loop"])
    summary = {"gpu": gpu, "torch": torch.__version__, "epochs": args.epochs, "cpu_epochs": args.cpu_epochs}
    print(f"\n{'variant':10s} {'s/epoch':>8s} {'x loop':>7s} {'test acc':>9s}")
    for name, runs in rows.items():
        seconds = statistics.median(r["epoch_seconds"] for r in runs)
        acc = ", ".join(f"{r['test_accuracy']:.4f}" for r in runs)
        print(f"{name:10s} {seconds:8.3f} {seconds / base:7.2f} {acc:>9s}")
        summary[name] = {"epoch_seconds": [round(r["epoch_seconds"], 4) for r in runs],
                         "test_accuracy": [round(r["test_accuracy"], 4) for r in runs],
                         "ratio_to_loop": round(seconds / base, 3)}
    emit(summary, args.json_out)


if __name__ == "__main__":
    main()
