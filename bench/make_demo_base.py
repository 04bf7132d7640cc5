"""Build the demo's in-house base reproducibly: toy data -> `base pretrain` (configs/pretrain-toy-cpu.yaml)
-> a clean diffusers folder of a few MB (fp16 weights, no checkpoints), judged by a probe CNN.

    python bench/make_demo_base.py --out checkpoints/demo-base          # ~N CPU minutes, see RESULTS.md
    python bench/make_demo_base.py --out /tmp/demo-base --smoke         # seconds, checks the script

Deterministic for a given torch build and thread count (one thread by default). Resumable: rerunning
continues the run in `--work` from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("model_index.json", "lesiongen_base.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="checkpoints/demo-base", help="the finished base folder")
    parser.add_argument("--config", default=str(ROOT / "configs" / "pretrain-toy-cpu.yaml"))
    parser.add_argument("--work", default="checkpoints/demo-base-run", help="toy data, run, checkpoints")
    parser.add_argument("--n-per-class", type=int, default=64, help="toy images per class")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pretrain_quality import base_mib, generate, make_judge, prepare_manifest

    from lesiongen.config import from_dict, load_yaml, merge
    from lesiongen.data.prompts import load_prompts
    from lesiongen.diffusion.loading import pipeline_hash
    from lesiongen.diffusion.pretrain import PretrainConfig, pretrain_base
    from lesiongen.diffusion.pretrain.checkpoints import checkpoints_in
    from lesiongen.utils.atomic import atomic_dir, ensure_writable

    out, work = Path(args.out), Path(args.work)
    ensure_writable(out, args.overwrite, what="demo base folder")
    overrides: dict = {"cpu_threads": args.threads}
    if args.smoke:
        args.n_per_class = 8
        overrides.update(preset="tiny", vae={"steps": 3, "batch_size": 4}, unet={"steps": 3, "batch_size": 4},
                         sample_every=0, samples_per_class=1, sample_steps=2)
    config = from_dict(PretrainConfig, merge(load_yaml(args.config), overrides), where=args.config)
    work.mkdir(parents=True, exist_ok=True)
    manifest = prepare_manifest("toy", work, args.n_per_class)
    run = work / "run"
    wall, cpu = time.perf_counter(), time.process_time()
    if not (run / "model_index.json").is_file():
        pretrain_base(manifest, run, config=config, resume="latest" if checkpoints_in(run) else None,
                      overwrite=not checkpoints_in(run), log=lambda line: print(line, flush=True))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    with atomic_dir(out) as tmp:
        for name in COMPONENTS:
            source = run / name
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp / name)
        shutil.copy2(run / "samples" / "final.png", tmp / "samples.png")
    judge, classes, ceiling = make_judge("probe", manifest, work, args.smoke, torch.device("cpu"))
    prompts = load_prompts(config.prompts)
    images, labels = generate(out, [prompts.class_prompt(c) for c in classes], 2 if args.smoke else 32,
                              3 if args.smoke else 25, config.guidance_scale, torch.device("cpu"))
    verdict = judge(images, labels)
    print(f"demo base -> {out}: {base_mib(out):.1f} MiB, hash {pipeline_hash(out)[:16]}, "
          f"trained in {wall / 60:.1f} min wall / {cpu / 60:.1f} CPU min; class fidelity {verdict['fidelity']:.3f} "
          f"({ceiling}; chance {1 / len(classes):.3f})")


if __name__ == "__main__":
    main()
