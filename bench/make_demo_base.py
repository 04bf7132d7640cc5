"""Build the demo's in-house base (`lesiongen/assets/demo-base.safetensors`) reproducibly, and judge it.

Steps, all through the project's own code: toy data made with seed 1 (the demo's own images use seed 0,
so the base never sees them) -> `base pretrain` with configs/pretrain-toy-cpu.yaml (tiny preset at
32 px by default: zero-terminal-SNR v-prediction, VAE 800 steps, UNet lr 2e-3) -> `base export` as one
fp16 single-file checkpoint with its configs in the metadata. Then it generates every class through
the plain pipeline `load_pipeline` returns and reports the class fidelity a probe CNN trained on the
demo's seed-0 toy images assigns (chance 1/7), with the time and the file size.

    python bench/make_demo_base.py                                     # ~9 CPU minutes idle (11 shared), one thread
    python bench/make_demo_base.py --out lesiongen/assets/demo-base.safetensors --overwrite
    python bench/make_demo_base.py --smoke --out /tmp/demo-base.safetensors --work /tmp/demo-base-run

Deterministic for a given torch build and thread count. Resumable: rerunning continues the run in
`--work` from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def toy_manifest(folder: Path, *, n_per_class: int, size: int, seed: int) -> Path:
    from lesiongen.data.index import index_dataset
    from lesiongen.data.toy import make_toy_dataset

    if not (folder / "labels.csv").is_file():
        make_toy_dataset(folder, n_per_class=n_per_class, size=size, seed=seed)
    manifest = folder.with_name(folder.name + "-manifest.csv")
    if not manifest.is_file():
        index_dataset(folder, out=manifest, seed=0)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="checkpoints/demo-base/demo-base.safetensors")
    parser.add_argument("--config", default=str(ROOT / "configs" / "pretrain-toy-cpu.yaml"))
    parser.add_argument("--preset", default="tiny", help="tiny (32 px, the shipped base) or small (64 px)")
    parser.add_argument("--unet-steps", type=int, default=2500)
    parser.add_argument("--work", default="checkpoints/demo-base", help="toy data, run folder, checkpoints")
    parser.add_argument("--n-per-class", type=int, default=32, help="toy images per class for pretraining")
    parser.add_argument("--samples-per-class", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="seconds-long check that the script runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lesiongen.config import from_dict, load_yaml, merge
    from lesiongen.data.prompts import load_prompts
    from lesiongen.diffusion.loading import load_pipeline
    from lesiongen.diffusion.presets import get_preset
    from lesiongen.diffusion.pretrain import PretrainConfig, pretrain_base
    from lesiongen.diffusion.pretrain.checkpoints import checkpoints_in
    from lesiongen.diffusion.pretrain.data import load_class_images
    from lesiongen.diffusion.pretrain.probe import train_probe
    from lesiongen.diffusion.single_file import export_single_file
    from lesiongen.utils.atomic import ensure_writable

    out, work = Path(args.out), Path(args.work)
    ensure_writable(out, args.overwrite, what="demo base file")
    overrides: dict = {"preset": args.preset, "cpu_threads": args.threads, "sample_every": 0,
                       "unet": {"steps": args.unet_steps}}
    if args.smoke:
        args.n_per_class, args.samples_per_class = 8, 2
        overrides.update(vae={"steps": 3, "batch_size": 4}, unet={"steps": 3, "batch_size": 4},
                         samples_per_class=1, sample_steps=2)
    config = from_dict(PretrainConfig, merge(load_yaml(args.config), overrides), where=args.config)
    size = get_preset(config.preset).resolution
    manifest = toy_manifest(work / "toy-seed1", n_per_class=args.n_per_class, size=size, seed=1)
    run = work / "run"
    wall, cpu = time.perf_counter(), time.process_time()
    pretrain_base(manifest, run, config=config, resume="latest" if checkpoints_in(run) else None,
                  overwrite=not checkpoints_in(run), log=lambda line: print(line, flush=True))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    export_single_file(load_pipeline(run), out, half=True, overwrite=args.overwrite)

    # Judge on the demo's own images (seed 0), which the base never saw.
    demo = toy_manifest(work / "toy-seed0", n_per_class=48, size=size, seed=0)
    train, test = load_class_images(demo, "train", 64), load_class_images(demo, "test", 64)
    probe = train_probe(train.images, train.labels, len(train.classes), steps=30 if args.smoke else 600)
    pipe = load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    prompts = load_prompts(config.prompts)
    images, labels = [], []
    for label, name in enumerate(train.classes):
        generators = [torch.Generator().manual_seed(1000 * label + i) for i in range(args.samples_per_class)]
        batch = pipe([prompts.class_prompt(name)] * args.samples_per_class, num_inference_steps=25,
                     guidance_scale=config.guidance_scale, generator=generators, output_type="pt").images
        images.append((batch * 255).round().to(torch.uint8))
        labels += [label] * args.samples_per_class
    fidelity = probe.class_fidelity(torch.cat(images), torch.tensor(labels))
    per_class = " ".join(f"{train.classes[c]}={v:.2f}" for c, v in sorted(fidelity["per_class"].items()))
    print(f"demo base -> {out}: {out.stat().st_size / 2**20:.1f} MiB; pretraining {wall / 60:.1f} min wall, "
          f"{cpu / 60:.1f} CPU min; class fidelity {fidelity['overall']:.3f} ({per_class}); probe accuracy on "
          f"real test images {probe.accuracy(test.images, test.labels):.3f}; chance {1 / len(train.classes):.3f}")


if __name__ == "__main__":
    main()
