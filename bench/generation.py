"""Generation throughput: lesiongen's renderer beside the plain diffusers pipeline, same run, equal steps.

SD-1.5 shapes with random weights, a rank-4 LoRA with non-zero weights and the class tokens loaded the
way a user loads an adapter, 512 px, bf16, DDIM 50 steps, CFG 7.5, VAE decode included:

- plain:      `pipe(prompt=..., negative_prompt=..., generator=[one per image])` with the LoRA attached
              (ANCHORS.md: 2.76 img/s at batch 8 on an H100, without LoRA);
- lesiongen:  `Renderer` after `optimize_for_inference`: LoRA folded into the weights, fused QKV,
              channels-last, prompt states encoded once per prompt (goal >= 1.3x);
- lesiongen + `torch.compile` of the UNet (`lesiongen generate --compile`).

    python bench/generation.py                  # CUDA, SD-1.5 shapes, batch 8 and 16
    python bench/generation.py --smoke          # tiny base on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from diffusion_common import describe_machine, device, free_memory, print_table, save_base, timed  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=50, help="sampling steps per image")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per pattern")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile pattern")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny base, CPU, a few steps")
    args = parser.parse_args()
    if args.smoke:
        args.batch_sizes, args.steps, args.repeats, args.no_compile = [2], 2, 1, True
    return args


def make_adapter(base: Path, folder: Path) -> Path:
    """An adapter folder with a random non-zero rank-4 LoRA and the 7 class tokens (what finetune writes)."""
    from peft import LoraConfig

    from lesiongen.data.prompts import load_prompts
    from lesiongen.diffusion.adapters import AdapterInfo, save_adapter
    from lesiongen.diffusion.fingerprint import pipeline_hash
    from lesiongen.diffusion.info import native_resolution
    from lesiongen.diffusion.loading import load_pipeline
    from lesiongen.diffusion.lora_files import LoraWeights
    from lesiongen.diffusion.tokens import add_learned_tokens

    if (folder / "adapter.json").is_file():
        return folder
    pipe, prompts = load_pipeline(base), load_prompts("ham10000")
    tokens = add_learned_tokens(pipe.tokenizer, pipe.text_encoder, prompts)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    info = AdapterInfo(method="lora+ti", base=str(base), base_hash=pipeline_hash(base), classes=tokens.class_tokens,
                       num_vectors=1, resolution=native_resolution(pipe), prompt_file=prompts.source, name="bench",
                       lora={"rank": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})
    return save_adapter(folder, info, lora=LoraWeights.from_models(unet=pipe.unet),
                        embeddings=tokens.embeddings(pipe.text_encoder))


def load(base: Path, adapter: Path):
    from lesiongen.diffusion.adapters import load_adapted_pipeline
    from lesiongen.diffusion.generate import inference_dtype, set_scheduler

    pipe = load_adapted_pipeline(base, adapter, torch_dtype=inference_dtype(device())).to(device())
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, "ddim")
    return pipe


def requests_for(batch_size: int):
    """One image per request, the classes in turn, seeds 0..batch_size-1."""
    from lesiongen.data.prompts import load_prompts
    from lesiongen.diffusion.generate import ImageRequest

    prompts = load_prompts("ham10000")
    classes = (prompts.class_names * batch_size)[:batch_size]
    return [ImageRequest(c, prompts.class_prompt(c), i, f"{i}.png") for i, c in enumerate(classes)], prompts


def plain_step(base: Path, adapter: Path, batch_size: int, steps: int, resolution: int):
    pipe = load(base, adapter)
    requests, prompts = requests_for(batch_size)

    def step() -> None:
        pipe(prompt=[r.prompt for r in requests], negative_prompt=[prompts.negative_prompt] * batch_size,
             num_inference_steps=steps, guidance_scale=7.5, height=resolution, width=resolution,
             generator=[torch.Generator().manual_seed(r.seed) for r in requests], output_type="pt")

    return step


def lesiongen_step(base: Path, adapter: Path, batch_size: int, steps: int, resolution: int, *, compile: bool):
    from lesiongen.diffusion.generate import GenerationSettings, Renderer, optimize_for_inference

    pipe = optimize_for_inference(load(base, adapter), fuse=True, compile=compile)
    requests, prompts = requests_for(batch_size)
    settings = GenerationSettings(steps=steps, guidance=7.5, scheduler="ddim", batch_size=batch_size)
    renderer = Renderer(pipe, settings, prompts.negative_prompt, resolution)
    return lambda: renderer(requests)


def main() -> None:
    args = parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (use --smoke for a CPU check of the script)")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        preset = "tiny" if args.smoke else "sd15"
        base = save_base(preset, work / f"base-{preset}")
        adapter = make_adapter(base, work / f"adapter-{preset}")
        resolution = 32 if args.smoke else 512
        print(f"{describe_machine()}; base {preset} (random weights) + rank-4 LoRA + class tokens, {resolution} px, "
              f"DDIM {args.steps} steps, CFG 7.5, VAE decode included, {args.repeats} timed batches")
        for batch_size in args.batch_sizes:
            common = (base, adapter, batch_size, args.steps, resolution)
            patterns = [("plain pipeline", partial(plain_step, *common)),
                        ("lesiongen", partial(lesiongen_step, *common, compile=False))]
            if not args.no_compile:
                patterns.append(("lesiongen + compile", partial(lesiongen_step, *common, compile=True)))
            rows = []
            for name, build in patterns:
                free_memory()
                started = time.perf_counter()
                step = build()
                seconds = timed(step, 1, args.repeats)  # the warm-up batch absorbs compilation
                overhead = time.perf_counter() - started - seconds * args.repeats
                rows.append((name, batch_size / seconds, f"setup + warm-up {overhead:.0f} s"))
                del step
            print_table(f"txt2img, batch {batch_size}", rows, "plain pipeline")


if __name__ == "__main__":
    main()
