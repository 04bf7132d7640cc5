"""DDIM inversion, the matching sampling loop, null-text, and the variant samplers on the tiny base.

The tiny base has random weights, so its noise prediction does not undo the 1/sqrt(alpha_bar) growth
of DDIM sampling (about 14.6x over the schedule): plain DDIM inversion, which evaluates the UNet one
level too low, is far off on it. Fixed-point refinement makes every inversion step the exact inverse of
its sampling step, which is what the round-trip test checks.
"""

from __future__ import annotations

import pytest
import torch
from synthesis_support import toy_batch

from lesiongen.synthesis.conditioning import Conditioning
from lesiongen.synthesis.inversion import (
    DDIMSchedule,
    InversionConfig,
    ddim_sample,
    invert,
    measure_round_trip,
    optimize_null_text,
)
from lesiongen.synthesis.variants import (
    ClassifierGuidance,
    VariantConfig,
    fit_image_embeddings,
    sample_variants,
    start_latents,
    variant_seed,
)

# Round trip with 50 steps, guidance 1 and fixed-point inversion: measured 0.3-0.5 % on toy images.
LATENT_TOLERANCE = 0.02  # ||z_rec - z|| / ||z||
MIN_INVERSION_PSNR = 40.0  # dB, reconstruction vs the VAE's own decode of z


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; spinning threads crawl
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from lesiongen.diffusion.loading import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe


@pytest.fixture(scope="module")
def batch(pipe, toy_manifest):
    """Two real toy images (mel, nv) at the pipeline's size, their latents and class prompts."""
    return toy_batch(pipe, toy_manifest)


@pytest.fixture(scope="module")
def refined(pipe, batch):
    """50-step inversion without guidance, fixed-point refined: (schedule, inversion)."""
    _, latents, cond, uncond = batch
    schedule = DDIMSchedule(pipe.scheduler.config, 50)
    config = InversionConfig(steps=50, guidance=1.0, fixed_point_iterations=10, fixed_point_tolerance=1e-6)
    return schedule, invert(pipe.unet, schedule, latents, cond, uncond, config, sampling_guidance=1.0)


def test_round_trip_reproduces_the_input_latent(pipe, batch, refined):
    images, latents, cond, uncond = batch
    schedule, inversion = refined
    round_trip = measure_round_trip(pipe.unet, pipe.vae, schedule, inversion, images)
    rows = round_trip.rows()
    assert len(rows) == 2  # reported per image
    for row in rows:
        assert row["latent_error"] < LATENT_TOLERANCE, row
        assert row["inversion_psnr"] > MIN_INVERSION_PSNR, row
        assert 0 < row["recon_psnr"] < 100 and -1 <= row["recon_ssim"] <= 1
        # the reconstruction is as close to the input as the VAE alone gets
        assert abs(row["recon_psnr"] - row["vae_psnr"]) < 0.5, row
    assert round_trip.reconstruction.shape == images.shape and round_trip.reconstruction.dtype == torch.uint8

    plain = invert(pipe.unet, schedule, latents, cond, uncond, InversionConfig(steps=50), sampling_guidance=1.0)
    plain_error = measure_round_trip(pipe.unet, pipe.vae, schedule, plain, images).latent_error
    assert (round_trip.latent_error * 50 < plain_error).all(), (round_trip.latent_error, plain_error)


def test_schedule_is_a_mirror_and_counts_strength_like_img2img(pipe, batch, refined):
    _, latents, cond, _ = batch
    schedule, inversion = refined
    assert torch.equal(schedule.inverter.timesteps.flip(0), schedule.timesteps)
    assert schedule.level_for_strength(0.6) == 30 and schedule.level_for_strength(1.0) == 50
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            schedule.level_for_strength(bad)
    with pytest.raises(ValueError, match="no sampling step"):
        schedule.level_for_strength(0.01)
    # sampling from any level of the refined trajectory comes back to the input (img2img at strength m/50)
    assert len(inversion.levels) == 51
    for level in (1, 10, 30):
        back = ddim_sample(pipe.unet, schedule, inversion.levels[level], Conditioning(cond), start_step=50 - level)
        assert (back - latents).norm() / latents.norm() < LATENT_TOLERANCE / 2


def test_start_latents_span_reconstruction_to_classic_img2img(pipe, batch):
    _, latents, cond, uncond = batch
    schedule = DDIMSchedule(pipe.scheduler.config, 10)
    inversion = invert(pipe.unet, schedule, latents, cond, uncond, InversionConfig(steps=10), sampling_guidance=3.0)
    fresh = torch.randn((4, *latents.shape[1:]), generator=torch.Generator().manual_seed(0))
    kept, start = start_latents(schedule, inversion, strength=0.6, renoise=0.0, fresh_noise=fresh, per_image=2)
    assert start == 4  # 10 steps, strength 0.6: the last 6 sampling steps run
    assert torch.allclose(kept, inversion.levels[6].repeat_interleave(2, dim=0), atol=1e-6)
    classic, _ = start_latents(schedule, inversion, strength=0.6, renoise=1.0, fresh_noise=fresh, per_image=2)
    timestep = schedule.inverter.timesteps[5]
    expected = schedule.sampler.add_noise(latents.repeat_interleave(2, dim=0), fresh, timestep.repeat(4))
    assert torch.allclose(classic, expected, atol=1e-6)


def test_variants_depend_on_their_seed_not_on_their_batch(pipe, batch):
    _, latents, cond, uncond = batch
    schedule = DDIMSchedule(pipe.scheduler.config, 10)
    inversion = invert(pipe.unet, schedule, latents, cond, uncond, InversionConfig(steps=10), sampling_guidance=2.0)
    config = VariantConfig(per_image=2, strength=0.7, renoise=0.5, guidance=2.0)
    seeds = [variant_seed(0, image, k) for image in ("a.png", "b.png") for k in range(2)]
    together = sample_variants(pipe.unet, pipe.vae, schedule, inversion, config, seeds=seeds)
    alone = sample_variants(pipe.unet, pipe.vae, schedule, inversion.select([1]), config, seeds=seeds[2:])
    assert together.shape == (4, 3, 32, 32) and together.dtype == torch.uint8
    assert (together[2:].int() - alone.int()).abs().max() <= 1  # same images, whatever else is in the batch
    assert not torch.equal(together[0], together[1])  # fresh noise differs per variant
    assert variant_seed(0, "a.png", 1) == variant_seed(0, "a.png", 1) != variant_seed(0, "a.png", 2)
    assert variant_seed(0, "a.png", 1) != variant_seed(1, "a.png", 1)


def test_image_embedding_fits_its_image(pipe, batch):
    _, latents, cond, _ = batch
    schedule = DDIMSchedule(pipe.scheduler.config, 10)
    fitted = fit_image_embeddings(pipe.unet, schedule, latents, cond, steps=15, lr=1e-2, seeds=[1, 2])
    assert fitted.shape == cond.shape and not torch.allclose(fitted, cond)

    def loss(embeddings):  # the diffusion loss on fixed draws
        generator = torch.Generator().manual_seed(123)
        total = 0.0
        for _ in range(8):
            t = torch.randint(0, 1000, (len(latents),), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            with torch.no_grad():
                out = pipe.unet(schedule.sampler.add_noise(latents, noise, t), t,
                                encoder_hidden_states=embeddings).sample
            total += (out - noise).pow(2).mean().item()
        return total

    assert loss(fitted) < loss(cond)


def test_null_text_pulls_guided_sampling_onto_the_trajectory(pipe, batch):
    images, latents, cond, uncond = batch
    schedule = DDIMSchedule(pipe.scheduler.config, 5)
    config = InversionConfig(steps=5, null_text_steps=10, null_text_lr=0.1)
    inversion = invert(pipe.unet, schedule, latents, cond, uncond, config, sampling_guidance=3.0)
    assert inversion.sampling.per_step and inversion.sampling.uncond.shape == (5, *uncond.shape)
    assert inversion.reconstruction is inversion.sampling  # variants sample along the fitted path too
    with_null_text = measure_round_trip(pipe.unet, pipe.vae, schedule, inversion, images).latent_error
    plain = ddim_sample(pipe.unet, schedule, inversion.inverted, Conditioning(cond, uncond, 3.0))
    without = (plain - latents).flatten(1).norm(dim=1) / latents.flatten(1).norm(dim=1)
    assert (with_null_text < without).all(), (with_null_text, without)
    with pytest.raises(ValueError, match="classifier-free guidance"):
        optimize_null_text(pipe.unet, schedule, inversion.levels, Conditioning(cond), iterations=1, lr=1e-2,
                           tolerance=0.0)


class CountingUNet(torch.nn.Module):
    """The UNet, counting its calls."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet, self.calls = unet, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.unet(*args, **kwargs)


def test_inverting_to_the_variants_start_is_the_full_trajectory_cut_short(pipe, batch, refined):
    """Variants start at level m, so inverting m of n steps is enough: the same levels as a full inversion
    up to m, a round trip from level m, and the variants unchanged, for 2m instead of 2n UNet calls."""
    images, latents, cond, uncond = batch
    schedule, full = refined
    config = InversionConfig(steps=50, guidance=1.0, fixed_point_iterations=10, fixed_point_tolerance=1e-6)
    counting = CountingUNet(pipe.unet)
    short = invert(counting, schedule, latents, cond, uncond, config, sampling_guidance=1.0, depth=30)
    assert short.depth == 30 and len(short.levels) == 31
    for level in (0, 1, 15, 30):
        assert torch.equal(short.levels[level], full.levels[level]), level
    inversion_calls = counting.calls
    round_trip = measure_round_trip(counting, pipe.vae, schedule, short, images)
    assert counting.calls - inversion_calls == 30  # sampling steps 20..49 only
    assert (round_trip.latent_error < LATENT_TOLERANCE).all(), round_trip.latent_error

    variants = VariantConfig(per_image=2, strength=0.6, renoise=0.5, guidance=1.0)
    seeds = [variant_seed(0, image, k) for image in ("a.png", "b.png") for k in range(2)]
    assert torch.equal(sample_variants(pipe.unet, pipe.vae, schedule, short, variants, seeds=seeds),
                       sample_variants(pipe.unet, pipe.vae, schedule, full, variants, seeds=seeds))
    with pytest.raises(ValueError, match="above the inversion's depth 30"):
        sample_variants(pipe.unet, pipe.vae, schedule, short, VariantConfig(per_image=2, strength=0.8), seeds=seeds)
    with pytest.raises(ValueError, match=r"depth must be in \[1, 50\]"):
        invert(pipe.unet, schedule, latents, cond, uncond, config, sampling_guidance=1.0, depth=51)
    with pytest.raises(ValueError, match="inversion depth must be one of"):
        InversionConfig(depth="half")


def test_null_text_on_a_short_trajectory_fits_only_the_steps_below_it(pipe, batch):
    images, latents, cond, uncond = batch
    schedule = DDIMSchedule(pipe.scheduler.config, 6)
    config = InversionConfig(steps=6, null_text_steps=10, null_text_lr=0.1)
    inversion = invert(pipe.unet, schedule, latents, cond, uncond, config, sampling_guidance=3.0, depth=3)
    per_step = inversion.sampling.uncond
    assert per_step.shape == (6, *uncond.shape)  # indexed by sampling step, as every sampler counts
    for step in range(3):  # never sampled from level 3: the starting embedding, untouched
        assert torch.equal(per_step[step], uncond)
    assert not torch.equal(per_step[3], uncond)
    with_null_text = measure_round_trip(pipe.unet, pipe.vae, schedule, inversion, images).latent_error
    plain = ddim_sample(pipe.unet, schedule, inversion.inverted, Conditioning(cond, uncond, 3.0), start_step=3)
    without = (plain - latents).flatten(1).norm(dim=1) / latents.flatten(1).norm(dim=1)
    assert (with_null_text < without).all(), (with_null_text, without)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_classifier_guidance_lowers_the_label_probability(pipe, batch, prediction_type):
    from lesiongen.classifier.models import ClassifierInfo, create_classifier
    from lesiongen.classifier.predict import predict_proba

    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    model = create_classifier("test_efficientnet", len(classes), "none").eval().requires_grad_(False)
    model.get_classifier().weight.mul_(100)  # a decisive classifier, so its gradient is not vanishing
    info = ClassifierInfo("test_efficientnet", classes, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    _, latents, cond, uncond = batch
    # the tiny UNet is random: read as a v-prediction model it is just another base
    schedule = DDIMSchedule({**pipe.scheduler.config, "prediction_type": prediction_type}, 10)
    inversion = invert(pipe.unet, schedule, latents, cond, uncond, InversionConfig(steps=10), sampling_guidance=2.0)
    config = VariantConfig(per_image=1, strength=0.8, guidance=2.0)
    plain = sample_variants(pipe.unet, pipe.vae, schedule, inversion, config, seeds=[1, 2])
    labels = torch.tensor([predict_proba(model, info, plain)[i].argmax() for i in range(2)])  # its current verdicts
    guidance = ClassifierGuidance(pipe.vae, model, info, schedule, labels, scale=300.0, target_prob=0.01)
    guided = sample_variants(pipe.unet, pipe.vae, schedule, inversion, config, seeds=[1, 2], correction=guidance)
    p_plain = predict_proba(model, info, plain)[torch.arange(2), labels]
    p_guided = predict_proba(model, info, guided)[torch.arange(2), labels]
    assert (p_guided < p_plain).all(), (p_plain, p_guided)


@pytest.mark.slow
def test_a_compiled_unet_inverts_and_samples_like_the_eager_one(pipe, batch):
    """`mine-and-generate --compile`: the same trajectory and variants (a minute of CPU compiling, so opt-in)."""
    _, latents, cond, uncond = batch
    schedule = DDIMSchedule(pipe.scheduler.config, 10)
    config = VariantConfig(per_image=2, strength=0.6, renoise=0.5, guidance=3.0)
    seeds = [variant_seed(0, image, k) for image in ("a.png", "b.png") for k in range(2)]
    results = []
    for unet in (pipe.unet, torch.compile(pipe.unet)):
        inversion = invert(unet, schedule, latents, cond, uncond, InversionConfig(steps=10), sampling_guidance=3.0,
                           depth=schedule.level_for_strength(config.strength))
        variants = sample_variants(unet, pipe.vae, schedule, inversion, config, seeds=seeds)
        results.append((inversion.levels[-1], variants))
    (eager_latents, eager_images), (compiled_latents, compiled_images) = results
    assert torch.allclose(compiled_latents, eager_latents, rtol=1e-4, atol=1e-4)
    assert (compiled_images.int() - eager_images.int()).abs().max() <= 1
