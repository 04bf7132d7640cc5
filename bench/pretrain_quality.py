"""How good a base does `base pretrain` make, how fast? One script for the CPU toy run and the GPU
derm-dev run.

It pretrains a base with a recipe (or several, `--variant name:key=value,...`, to compare options in one
run), generates images through the ordinary `StableDiffusionPipeline` that `load_pipeline` returns (the
path every other command takes), and judges them:

- `--judge probe` (default): a small CNN trained here on the real training images; class fidelity only.
  Its accuracy on the real test split is printed as the ceiling.
- `--judge DIR`: a classifier trained on the real data (`lesiongen train-classifier`); class fidelity and
  the domain feature distance (Fréchet distance in its feature space, `lesiongen.metrics`), and "VAE
  keeps": its balanced accuracy on the VAE round trips of the real test images (per class in the log), which
  shows the classes whose evidence the VAE loses.

Data: `--data toy` (made here), `--data derm-dev` (../shared/data/derm-dev, indexed here) or a manifest.

    python bench/pretrain_quality.py --config configs/pretrain-toy-cpu.yaml              # CPU, toy data, 32 px
    python bench/pretrain_quality.py --config configs/pretrain-derm-dev-gpu.yaml --data derm-dev \\
        --judge checkpoints/classifier-derm-dev --time-limit 9 --work checkpoints/bench-pretrain  # GPU, repeat
    python bench/pretrain_quality.py --variant eps:unet.prediction_type=epsilon,unet.noise_schedule=sd15 \\
        --variant v: --preset tiny                                                         # compare recipes
    python bench/pretrain_quality.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DERM_DEV = ROOT.parent / "shared" / "data" / "derm-dev"


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:unet.steps=400,unet.prediction_type=v_prediction' -> (name, nested overrides)."""
    import yaml

    name, _, body = text.partition(":")
    overrides: dict = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        node = overrides
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    return name, overrides


def base_mib(path: Path) -> float:
    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    return sum(f.stat().st_size for c in components for f in (path / c).rglob("*") if f.is_file()) / 2**20


def prepare_manifest(data: str, work: Path, n_per_class: int) -> Path:
    from lesiongen.data.index import index_dataset

    if data not in ("toy", "derm-dev"):
        return Path(data)
    source = work / f"toy-{n_per_class}" if data == "toy" else DERM_DEV
    if data == "toy" and not (source / "labels.csv").is_file():
        from lesiongen.data.toy import make_toy_dataset

        make_toy_dataset(source, n_per_class=n_per_class, size=64, seed=0)
    manifest = work / f"{source.name}-manifest.csv"
    if not manifest.is_file():
        index_dataset(source, out=manifest, seed=0)
    return manifest


def make_judge(judge: str, manifest: Path, work: Path, smoke: bool, device: torch.device):
    """A callable (images uint8, labels) -> {'fidelity', 'per_class', 'domain_distance'}, the class names, a
    ceiling line, and (classifier judges only) a callable vae -> the judge on the test images' VAE round trips."""
    from lesiongen.diffusion.pretrain.data import load_class_images

    train = load_class_images(manifest, "train", 64)
    test = load_class_images(manifest, "test", 64)
    if judge == "probe":
        from lesiongen.diffusion.pretrain.probe import train_probe

        probe = train_probe(train.images, train.labels, len(train.classes), steps=30 if smoke else 600,
                            weights=work / f"probe-{manifest.stem}-{'smoke' if smoke else 'full'}.safetensors")

        def by_probe(images, labels):
            result = probe.class_fidelity(images, labels)
            return {"fidelity": result["overall"], "per_class": result["per_class"], "domain_distance": None}

        accuracy = probe.accuracy(test.images, test.labels)
        return by_probe, train.classes, f"probe CNN accuracy on real test images {accuracy:.3f}", None
    from lesiongen.diffusion.pretrain.evaluation import SampleJudge

    sample_judge = SampleJudge(judge, train.images, train.classes, device)

    def by_classifier(images, labels):
        result = sample_judge(images, labels)
        per_class = {train.classes.index(k): v
                     for k, v in result["class_fidelity"]["per_class"].items() if v is not None}
        return {"fidelity": result["class_fidelity"]["overall"], "per_class": per_class,
                "domain_distance": result.get("domain_distance")}

    real = by_classifier(test.images, test.labels)
    balanced = sum(real["per_class"].values()) / len(real["per_class"])
    # Samples come in equal numbers per class, so their fidelity compares with the real images' balanced accuracy.
    ceiling = (f"classifier {judge} on real test images: accuracy {real['fidelity']:.3f}, balanced accuracy "
               f"{balanced:.3f}, real-vs-real-train domain distance {real['domain_distance']}")
    def by_vae_round_trip(vae, resolution: int) -> dict:  # the test images at the base's own resolution
        held_out = test if resolution == 64 else load_class_images(manifest, "test", resolution)
        return sample_judge.reconstruction(vae, held_out.images, held_out.labels)

    return by_classifier, train.classes, ceiling, by_vae_round_trip


def generate(base: Path, prompts: list[str], per_class: int, steps: int, guidance: float, device: torch.device):
    """Through the plain pipeline: one seeded CPU generator per image."""
    from lesiongen.diffusion.loading import load_pipeline

    pipe = load_pipeline(base).to(device)
    pipe.set_progress_bar_config(disable=True)
    images, labels = [], []
    for label, prompt in enumerate(prompts):
        for start in range(0, per_class, 64):
            count = min(64, per_class - start)
            generators = [torch.Generator().manual_seed(100_000 * label + start + i) for i in range(count)]
            out = pipe([prompt] * count, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                       output_type="pt").images
            images.append((out.cpu() * 255).round().clamp(0, 255).to(torch.uint8))
            labels += [label] * count
    return torch.cat(images), torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (default: the PretrainConfig defaults)")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--variant", action="append", default=[], help="name:key=value,... (repeatable)")
    parser.add_argument("--data", default="toy", help="toy | derm-dev | a manifest path")
    parser.add_argument("--judge", default="probe", help="probe | a classifier folder trained on the real data")
    parser.add_argument("--n-per-class", type=int, default=64, help="toy data size")
    parser.add_argument("--samples-per-class", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0],
                        help="CFG scale(s); several judge every base at each (a sweep costs sampling only)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="minutes of training in this invocation; rerun the same command to continue")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="minutes of training in all: fits the recipe's step counts to them (time_budget_minutes)")
    parser.add_argument("--work", default="checkpoints/bench-pretrain", help="data, runs and grids")
    parser.add_argument("--smoke", action="store_true", help="seconds-long check that the bench runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lesiongen.config import from_dict, load_yaml, merge
    from lesiongen.data.prompts import load_prompts
    from lesiongen.diffusion.pretrain import PretrainConfig, pretrain_base
    from lesiongen.diffusion.pretrain.checkpoints import checkpoints_in
    from lesiongen.diffusion.pretrain.sampling import save_grid
    from lesiongen.diffusion.saving import PROVENANCE_FILE

    if args.smoke:
        args.n_per_class, args.samples_per_class, args.sample_steps = 8, 2, 3
        args.variant = args.variant or ["smoke:vae.steps=3,unet.steps=3,vae.batch_size=4,unet.batch_size=4,"
                                        "samples_per_class=1,sample_steps=2,device=cpu"]
        args.preset = args.preset or "tiny"
        args.work = str(Path(args.work) / "smoke")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    manifest = prepare_manifest(args.data, work, args.n_per_class)
    base_cfg = load_yaml(args.config) if args.config else {}
    if args.preset:
        base_cfg["preset"] = args.preset
    variants = [parse_variant(v) for v in args.variant] or [("default", {})]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    judge, classes, ceiling, vae_judge = make_judge(args.judge, manifest, work, args.smoke, device)
    print(ceiling)

    rows = []
    for name, overrides in variants:
        run_settings = {"cpu_threads": args.threads}
        if args.time_budget:
            run_settings["time_budget_minutes"] = args.time_budget
        config = from_dict(PretrainConfig, merge(merge(base_cfg, overrides), run_settings), where=f"variant {name}")
        out = work / f"run-{name}"
        resume = "latest" if checkpoints_in(out) else None
        if (out / "model_index.json").is_file():
            print(f"{name}: finished earlier in {out}; judging it again")
            wall = cpu = float("nan")
        else:
            wall, cpu = time.perf_counter(), time.process_time()
            result = pretrain_base(manifest, out, config=config, resume=resume, overwrite=resume is None,
                                   time_limit_s=args.time_limit * 60 if args.time_limit else None,
                                   log=lambda line: print(f"  [{name}] {line}", flush=True))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if not result.finished:
                print(f"{name}: paused at step {result.global_step} after {wall / 60:.1f} min; rerun to continue")
                return
        prompts = load_prompts(config.prompts)
        provenance = json.loads((out / PROVENANCE_FILE).read_text(encoding="utf-8"))
        steps = provenance["steps"]  # planned, with a budget
        vae_kept = None
        if vae_judge is not None:  # class evidence left in this VAE's round trips
            from lesiongen.diffusion.loading import load_pipeline

            kept = vae_judge(load_pipeline(out).vae.to(device).eval(), provenance["resolution"])
            vae_kept = kept["round_trip"]["balanced_accuracy"]
            per_class = " ".join(f"{c}={v:.2f}" for c, v in kept["round_trip"]["per_class"].items())
            print(f"{name}: VAE round trips of the test images: judge balanced accuracy {vae_kept:.3f} "
                  f"({per_class}; originals {kept['original']['balanced_accuracy']:.3f}), RMSE {kept['rmse']:.1f}")
        for guidance in args.guidance:
            images, labels = generate(out, [prompts.class_prompt(c) for c in classes], args.samples_per_class,
                                      args.sample_steps, guidance, device)
            verdict = judge(images, labels)
            shown = min(8, args.samples_per_class)
            rows_start = torch.arange(len(classes)).repeat_interleave(shown) * args.samples_per_class
            pick = rows_start + torch.arange(shown).repeat(len(classes))
            suffix = "" if len(args.guidance) == 1 else f"-cfg{guidance:g}"
            grid = save_grid(images[pick], len(classes), work / f"grid-{name}{suffix}.png", row_labels=classes)
            rows.append((name, guidance, config, steps, wall, cpu, verdict, vae_kept, base_mib(out)))
            per_class = " ".join(f"{classes[c]}={v:.2f}" for c, v in sorted(verdict["per_class"].items()))
            print(f"{name}, CFG {guidance:g}: class fidelity {verdict['fidelity']:.3f} ({per_class}); grid {grid}",
                  flush=True)

    print("\n| variant | CFG | preset | px | VAE steps | UNet steps | target / schedule | wall min | CPU min "
          "| class fidelity | VAE keeps | domain distance | base MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, guidance, config, steps, wall, cpu, verdict, vae_kept, mib in rows:
        distance = f"{verdict['domain_distance']:.3g}" if verdict["domain_distance"] is not None else "-"
        kept_cell = f"{vae_kept:.3f}" if vae_kept is not None else "-"
        print(f"| {name} | {guidance:g} | {config.preset} | {config.resolution or '-'} | {steps['vae']} | "
              f"{steps['unet']} | {config.unet.prediction_type} / {config.unet.noise_schedule} | {wall / 60:.1f} | "
              f"{cpu / 60:.1f} | {verdict['fidelity']:.3f} | {kept_cell} | {distance} | {mib:.1f} |")
    print(f"\n{ceiling}; chance {1 / len(classes):.3f}; {args.samples_per_class} samples per class through "
          f"StableDiffusionPipeline, DDIM {args.sample_steps} steps; device {device}, "
          f"torch threads {args.threads}; data {manifest}")


if __name__ == "__main__":
    main()
