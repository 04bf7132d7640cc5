"""Classifier training throughput: lesiongen's real data pipeline beside the synthetic-tensor ceiling.

Both patterns run in one process on the same model, optimizer and accelerate setup (bf16 autocast,
channels_last, fused AdamW):

- ceiling:  a fixed batch of normalised float images already on the GPU -> `trainer.optimize` (forward,
            backward, step): what the model alone can do (ANCHORS.md: efficientnet_b0, 224 px, batch 256,
            4,404 img/s on an H100);
- pipeline: `trainer.train_step` fed by the trainer's own loader: positions drawn by the class-balanced
            sampler, uint8 images gathered from the decoded set on the device, random resized crop +
            dihedral + colour jitter (+ optional Shades of Gray), normalise, then the same `optimize`.

The images are decoded once before timing (that is the design: decode once, augment on the device).
The goal is pipeline >= 90 % of the ceiling.

    python bench/classifier_throughput.py                       # derm-dev if present, else toy data
    python bench/classifier_throughput.py --data ../shared/data/derm-dev --load-size 128
    python bench/classifier_throughput.py --smoke               # tiny CPU check that the script works
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DERM_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "derm-dev"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="image folder with labels.csv (default: derm-dev, else toy)")
    parser.add_argument("--arch", default="efficientnet_b0")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--load-size", type=int, default=None, help="decode size (default: img-size)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per pattern")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--color-constancy", type=float, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy data, 64 px, a few steps")
    return parser.parse_args()


def build_trainer(args: argparse.Namespace, workdir: Path):
    from lesiongen.classifier.config import TrainConfig
    from lesiongen.classifier.train import ClassifierTrainer
    from lesiongen.data.index import index_dataset
    from lesiongen.data.toy import make_toy_dataset

    data = args.data
    if data is None:
        data = DERM_DEV if (DERM_DEV / "labels.csv").is_file() and not args.smoke else None
    if data is None:
        data = make_toy_dataset(workdir / "toy", n_per_class=8 if args.smoke else 64, size=64, seed=0)
    manifest = workdir / "manifest.csv"
    index_dataset(data, out=manifest, seed=0)
    config = TrainConfig(manifest=str(manifest), arch=args.arch, pretrained="none", img_size=args.img_size,
                         load_size=args.load_size, batch_size=args.batch_size, epochs=1000,
                         color_constancy=args.color_constancy, compile=args.compile,
                         eval_batch_size=args.batch_size)  # the shared decode cache: a training run fills it
    trainer = ClassifierTrainer(config, workdir / "run")
    trainer.setup()
    return trainer, data


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, n_warmup: int, n_steps: int, device: torch.device) -> float:
    """Seconds for `n_steps` calls of `step` after `n_warmup` untimed ones."""
    for _ in range(n_warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.img_size, args.batch_size, args.steps, args.warmup = 64, 8, 3, 1
        os.environ["ACCELERATE_USE_CPU"] = "true"
    with tempfile.TemporaryDirectory() as tmp:
        trainer, data = build_trainer(args, Path(tmp))
        device = trainer.accelerator.device
        trainer.model.train()

        def epochs():
            for epoch in itertools.count():
                trainer.train_loader.set_epoch(epoch)
                yield from trainer.train_loader

        batches = epochs()

        def pipeline_step():
            trainer.train_step(next(batches))

        # The ceiling: one prepared batch, resident on the device, reused every step.
        images, labels, weights = trainer.training_batch(next(batches))
        images = torch.randn_like(images).contiguous(memory_format=torch.channels_last)

        def ceiling_step():
            trainer.optimize(images, labels, weights)

        ceiling = timed(ceiling_step, args.warmup, args.steps, device)
        pipeline = timed(pipeline_step, args.warmup, args.steps, device)
        ceiling_rate = args.steps * args.batch_size / ceiling
        pipeline_rate = args.steps * args.batch_size / pipeline

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}; mixed precision {trainer.accelerator.mixed_precision}; "
          f"data {data}; decoded at {trainer.config.decode_size} px")
    print(f"{args.arch}, {args.img_size} px, batch {args.batch_size}, channels_last, "
          f"{args.steps} timed steps after {args.warmup} warm-up{', compiled' if args.compile else ''}\n")
    print("| pattern | img/s | vs ceiling |")
    print("| --- | ---: | ---: |")
    print(f"| ceiling: synthetic tensors on the device | {ceiling_rate:,.0f} | 100 % |")
    print(f"| lesiongen pipeline: sampler + device gather + augmentation | {pipeline_rate:,.0f} | "
          f"{100 * pipeline_rate / ceiling_rate:.1f} % |")
    print(f"\nratio pipeline / ceiling = {pipeline_rate / ceiling_rate:.3f} (goal >= 0.90)")


if __name__ == "__main__":
    main()
