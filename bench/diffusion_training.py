"""Fine-tuning throughput: lesiongen's training loop beside a diffusers-example-like loop, same run.

SD-1.5 shapes with random weights (`build_pipeline("sd15")`, speed does not depend on weight values),
512 px, bf16, fused AdamW, on synthetic 128 px images upsampled by the loader:

- LoRA, rank 4 on to_q / to_k / to_v / to_out.0, batch 16:
  - script-like:  what diffusers' `train_text_to_image_lora.py` does every step: VAE-encode the batch,
                  run the text encoder, UNet forward / backward (ANCHORS.md: 56.7 img/s on an H100);
  - lesiongen:    `Trainer.optimizer_step` with its defaults: latents and text states cached, class-balanced
                  draws, min-SNR weighting, channels-last, `torch.compile` on CUDA (goal >= 2x);
  - lesiongen, no compile.
- Textual inversion (one token, batch 16): diffusers' `textual_inversion.py` pattern (VAE every step, the
  embedding matrix trained with its other rows restored) beside lesiongen's `--method ti`.

    python bench/diffusion_training.py                 # CUDA, SD-1.5 shapes
    python bench/diffusion_training.py --smoke         # tiny base on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusion_common import (  # noqa: E402
    describe_machine,
    device,
    free_memory,
    print_table,
    save_base,
    synthetic_manifest,
    timed,
)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CAPTION = "a dermoscopy image of a melanoma"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per pattern")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    parser.add_argument("--images", type=int, default=256, help="synthetic training images")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the base and data here between runs")
    parser.add_argument("--skip-ti", action="store_true")
    parser.add_argument("--skip-lora", action="store_true", help="only the textual-inversion table")
    parser.add_argument("--smoke", action="store_true", help="tiny base, CPU, 32 px, a few steps")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.resolution, args.steps, args.warmup, args.images = 2, 32, 2, 1, 14
    return args


def weight_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def script_like_step(base: Path, batch_size: int, resolution: int, *, token: str | None):
    """(step function, setup seconds) in the diffusers-example style; `token` switches LoRA to textual inversion."""
    started = time.perf_counter()
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from lesiongen.diffusion.loading import load_pipeline

    dtype, dev = weight_dtype(), device()
    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    pipe = load_pipeline(base)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    caption = CAPTION
    if token is None:
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        text_encoder.to(dev, dtype)
        trained = unet
    else:
        tokenizer.add_tokens([token])
        text_encoder.resize_token_embeddings(len(tokenizer))
        text_encoder.get_input_embeddings().weight.requires_grad_(True)
        text_encoder.to(dev)  # the TI script keeps the trained text encoder in fp32
        trained, caption = text_encoder, f"a dermoscopy image of {token}"
    vae.to(dev, dtype)
    unet.to(dev, dtype)
    cast_training_params(unet, torch.float32)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    trained, optimizer = accelerator.prepare(trained, optimizer)
    unet_call = trained if token is None else unet
    text_call = text_encoder if token is None else trained
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.rand(batch_size, 3, resolution, resolution, device=dev, dtype=dtype) * 2 - 1
    ids = tokenizer([caption] * batch_size, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(dev)
    embedding = text_encoder.get_input_embeddings().weight
    original = embedding.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=dev)
    keep[-1] = False

    def step() -> None:
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=dev)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        # as the diffusers scripts do: the TI script's text encoder stays fp32, the UNet runs in weight dtype
        states = text_call(ids, return_dict=False)[0].to(dtype)
        prediction = unet_call(noisy, timesteps, states, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if token is not None:
            with torch.no_grad():
                embedding[keep] = original[keep]

    return step, time.perf_counter() - started


def lesiongen_step(base: Path, manifest: Path, out: Path, batch_size: int, resolution: int, *, method: str,
                   compile: bool | None):
    from lesiongen.diffusion.finetune import FinetuneConfig, LoraSettings
    from lesiongen.diffusion.finetune.loop import Trainer

    config = FinetuneConfig(base=str(base), manifest=str(manifest), out=str(out), method=method, steps=10**6,
                            batch_size=batch_size, resolution=resolution, compile=compile, validate_every=0,
                            lora=LoraSettings(rank=4, alpha=4, target_modules=list(LORA_TARGETS)))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    trainer = Trainer(config).setup()  # includes encoding every image (and flip) once
    return (lambda: trainer.run_steps(1)), time.perf_counter() - started


def measure(name: str, build, args) -> tuple[str, float, str]:
    """Throughput of the step function `build()` returns; the note gives one-time costs and memory."""
    free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step, setup_seconds = build()
    started = time.perf_counter()
    seconds = timed(step, args.warmup, args.steps)
    warmup = time.perf_counter() - started - seconds * args.steps
    memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
    del step
    return name, args.batch_size / seconds, f"setup {setup_seconds:.0f} s, warm-up {warmup:.0f} s{memory}"


def main() -> None:
    args = parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (use --smoke for a CPU check of the script)")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        preset = "tiny" if args.smoke else "sd15"
        base = save_base(preset, work / f"base-{preset}")  # the folder name bench/generation.py reuses
        manifest = synthetic_manifest(work / "data", args.images)
        bs, res = args.batch_size, args.resolution
        print(f"{describe_machine()}; base {preset} (random weights), {res} px, "
              f"batch {bs}, {weight_dtype()}, {args.steps} timed steps after {args.warmup} warm-up steps")
        if not args.skip_lora:
            rows = [
                measure("script-like LoRA", lambda: script_like_step(base, bs, res, token=None), args),
                measure("lesiongen LoRA (default)", lambda: lesiongen_step(base, manifest, work / "run-lora", bs, res,
                                                                           method="lora", compile=None), args),
                measure("lesiongen LoRA, no compile",
                        lambda: lesiongen_step(base, manifest, work / "run-lora-eager", bs, res, method="lora",
                                               compile=False), args),
            ]
            print_table("LoRA training (rank 4, to_q/k/v/out)", rows, "script-like LoRA")
        if not args.skip_ti:
            rows = [
                measure("script-like TI", lambda: script_like_step(base, bs, res, token="<bench-tok>"), args),
                measure("lesiongen TI (default)", lambda: lesiongen_step(base, manifest, work / "run-ti", bs, res,
                                                                         method="ti", compile=None), args),
            ]
            print_table("Textual inversion (token rows only)", rows, "script-like TI")


if __name__ == "__main__":
    main()
