"""Inversion and variant throughput: lesiongen's hard-case loops beside the plain loops, same run.

SD-1.5 shapes with random weights (speed does not depend on the values), 512 px, fp16 on CUDA, DDIM
50 steps, synthetic uint8 inputs; every pattern includes VAE encode (and decode where it makes images).

Inversion (ANCHORS.md: 6.08 img/s at batch 32 on an H100):
- plain:     per batch, the prompts through the text encoder, VAE encode, a loop over
             `DDIMInverseScheduler` calling the UNet on the conditional batch (what the deprecated
             diffusers inversion pipelines and most scripts do);
- lesiongen: `lesiongen.synthesis.inversion.invert` after `optimize_for_inference` (fused QKV,
             channels-last), prompt embeddings from the run's cache; optionally `torch.compile`d. A
             "contiguous" row runs it without channels-last, to tell the layout's cost from the rest;
             "feature cache N" rows recompute the deep UNet features every N steps (DeepCache,
             `mine-and-generate --feature-cache N`), an approximation: tests/test_synthesis_feature_cache.py.

Variants (ANCHORS.md: about 0.35 s per variant = a 50-step inversion + img2img at strength 0.6 with CFG):
- plain:     every variant pays its own inversion, then diffusers-style img2img (batched CFG, re-noise
             the clean latent to the strength's timestep, decode);
- lesiongen: what `mine-and-generate` does per batch of sources: one inversion per source, the
             invert -> regenerate round trip (reported for every image), then `--variants K` variants
             sampled from the shared trajectory in one batch, decoded. Seconds per variant.

The goal is >= 2x on both. Run it where the GPU is and paste the table into bench/RESULTS.md:

    python bench/inversion_variants.py                       # CUDA, SD-1.5 shapes, batch 32
    python bench/inversion_variants.py --compile             # add the torch.compile patterns
    python bench/inversion_variants.py --smoke               # tiny base on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from diffusion_common import describe_machine, device, free_memory, timed  # noqa: E402

PROMPTS = ["a dermoscopy image of <derm-mel> melanoma", "a dermoscopy image of <derm-nv> melanocytic nevus"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="source images per batch")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (inversion and sampling)")
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG of the variants")
    parser.add_argument("--variants", type=int, default=4, help="variants per source image (lesiongen)")
    parser.add_argument("--repeats", type=int, default=2, help="timed batches per pattern")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd UNet")
    parser.add_argument("--feature-cache", type=int, default=2,
                        help="also time DeepCache with this interval (compiled with --compile); 1: skip")
    parser.add_argument("--smoke", action="store_true", help="tiny base, CPU, a few steps")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.steps, args.repeats, args.variants, args.compile = 2, 4, 1, 2, False
    return args


# -- the plain loops (reference) --------------------------------------------------------------------


def plain_encode(pipe, images: torch.Tensor) -> torch.Tensor:
    pixels = images.to(pipe.device, pipe.unet.dtype) / 127.5 - 1
    return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def plain_inversion(pipe, images: torch.Tensor, prompts: list[str], steps: int) -> torch.Tensor:
    from diffusers import DDIMInverseScheduler

    embeds, _ = pipe.encode_prompt(prompts, pipe.device, 1, False)
    latents = plain_encode(pipe, images)
    scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=pipe.device)
    for t in scheduler.timesteps:
        noise = pipe.unet(latents, t, encoder_hidden_states=embeds).sample
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents


@torch.no_grad()
def plain_img2img(pipe, images: torch.Tensor, prompts: list[str], steps: int, strength: float,
                  guidance: float) -> torch.Tensor:
    """diffusers' StableDiffusionImg2ImgPipeline loop: batched CFG, fresh noise at the strength's step."""
    from diffusers import DDIMScheduler

    cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, True, [""] * len(prompts))
    embeds = torch.cat([uncond, cond])
    latents = plain_encode(pipe, images)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=pipe.device)
    start = steps - int(steps * strength)
    timesteps = scheduler.timesteps[start:]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(len(latents)))
    for t in timesteps:
        out_uncond, out_cond = pipe.unet(torch.cat([latents, latents]), t, encoder_hidden_states=embeds).sample.chunk(2)
        latents = scheduler.step(out_uncond + guidance * (out_cond - out_uncond), t, latents).prev_sample
    return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample


# -- lesiongen's loops ------------------------------------------------------------------------------


class Ours:
    """The same work `mine-and-generate` does on a batch, through the library functions it uses."""

    def __init__(self, pipe, args: argparse.Namespace, unet=None) -> None:
        from lesiongen.synthesis.conditioning import PromptCache
        from lesiongen.synthesis.inversion import DDIMSchedule, InversionConfig
        from lesiongen.synthesis.latents import pipeline_resolution
        from lesiongen.synthesis.variants import VariantConfig

        self.pipe, self.args = pipe, args
        self.unet = unet if unet is not None else pipe.unet
        self.schedule = DDIMSchedule(pipe.scheduler.config, args.steps, pipe.device)
        self.cache = PromptCache(pipe, pipe.device)
        self.resolution = pipeline_resolution(pipe)
        self.inversion_config = InversionConfig(steps=args.steps)
        self.variant_config = VariantConfig(per_image=args.variants, strength=args.strength, guidance=args.guidance)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, prompts: list[str], sampling_guidance: float = 1.0,
               depth: int | None = None):
        from lesiongen.synthesis.inversion import invert
        from lesiongen.synthesis.latents import encode, to_model_pixels

        pixels = to_model_pixels(images, self.resolution, device=self.pipe.device, dtype=self.pipe.unet.dtype)
        latents = encode(self.pipe.vae, pixels)
        cond, uncond = self.cache(prompts), self.cache([""] * len(prompts))
        return invert(self.unet, self.schedule, latents, cond, uncond, self.inversion_config,
                      sampling_guidance=sampling_guidance, depth=depth)

    @torch.no_grad()
    def variants(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from lesiongen.synthesis.inversion import measure_round_trip
        from lesiongen.synthesis.variants import sample_variants, variant_seed

        # as mine-and-generate does: invert only up to where the variants start
        depth = self.schedule.level_for_strength(self.args.strength)
        inversion = self.invert(images, prompts, self.args.guidance, depth)
        measure_round_trip(self.unet, self.pipe.vae, self.schedule, inversion, images)
        seeds = [variant_seed(0, f"image-{i}", k) for i in range(len(images)) for k in range(self.args.variants)]
        return sample_variants(self.unet, self.pipe.vae, self.schedule, inversion, self.variant_config, seeds=seeds)


def main() -> None:
    from lesiongen.diffusion.build import build_pipeline
    from lesiongen.diffusion.generate import optimize_for_inference

    args = parse_args()
    dev = device()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    preset = "tiny" if args.smoke else "sd15"
    pipe = build_pipeline(preset, seed=0).to(dev, dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    b = args.batch_size
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prompts = [PROMPTS[i % 2] for i in range(b)]
    print(f"{describe_machine()}: {preset} at {size} px, {dtype}, batch {b}, DDIM {args.steps} steps, "
          f"strength {args.strength}, CFG {args.guidance}, {args.variants} variants per source")

    def per_variant_plain() -> None:
        plain_inversion(pipe, images, prompts, args.steps)
        plain_img2img(pipe, images, prompts, args.steps, args.strength, args.guidance)

    rows = []  # (job, pattern, seconds per batch, items per batch)
    rows.append(("inversion", "plain",
                 timed(lambda: plain_inversion(pipe, images, prompts, args.steps), 1, args.repeats), b))
    rows.append(("variant", "plain", timed(per_variant_plain, 1, args.repeats), b))
    free_memory()

    optimize_for_inference(pipe, fuse=True, compile=False)
    ours = Ours(pipe, args)
    # Eager lesiongen trailed plain in fp16 on the GPU (0.85x): is it the channels-last layout (CUDA only)?
    for module in (pipe.unet, pipe.vae):
        module.to(memory_format=torch.contiguous_format)
    rows.append(("inversion", "lesiongen, contiguous", timed(lambda: ours.invert(images, prompts), 1,
                                                             args.repeats), b))
    rows.append(("variant", "lesiongen, contiguous", timed(lambda: ours.variants(images, prompts), 1,
                                                           args.repeats), b * args.variants))
    if dev.type == "cuda":
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.channels_last)  # back to what optimize_for_inference ships
    rows.append(("inversion", "lesiongen", timed(lambda: ours.invert(images, prompts), 1, args.repeats), b))
    rows.append(("variant", "lesiongen", timed(lambda: ours.variants(images, prompts), 1, args.repeats),
                 b * args.variants))
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)
        ours = Ours(pipe, args)
        rows.append(("inversion", "lesiongen + compile",
                     timed(lambda: ours.invert(images, prompts), 2, args.repeats), b))
        rows.append(("variant", "lesiongen + compile", timed(lambda: ours.variants(images, prompts), 1, args.repeats),
                     b * args.variants))
    if args.feature_cache > 1:
        from lesiongen.synthesis.feature_cache import FeatureCachedUNet

        cached = Ours(pipe, args, FeatureCachedUNet(pipe.unet, args.feature_cache, compile=args.compile))
        name = f"lesiongen + feature cache {args.feature_cache}" + (" + compile" if args.compile else "")
        rows.append(("inversion", name, timed(lambda: cached.invert(images, prompts), 2, args.repeats), b))
        rows.append(("variant", name, timed(lambda: cached.variants(images, prompts), 1, args.repeats),
                     b * args.variants))
    report(rows)


def report(rows: list[tuple[str, str, float, int]]) -> None:
    print("\n| job | pattern | img/s | s per image | vs plain |")
    print("| --- | --- | ---: | ---: | ---: |")
    plain = {job: seconds / items for job, pattern, seconds, items in rows if pattern == "plain"}
    for job, pattern, seconds, items in rows:
        per_item = seconds / items
        print(f"| {job} | {pattern} | {1 / per_item:.2f} | {per_item:.4f} | {plain[job] / per_item:.2f}x |")
    print("\nanchors (H100, ANCHORS.md): inversion 6.08 img/s at batch 32; about 0.35 s per variant; goal >= 2x.")
    print("'variant' for lesiongen includes its share of the inversion and of the round-trip check.")


if __name__ == "__main__":
    main()
