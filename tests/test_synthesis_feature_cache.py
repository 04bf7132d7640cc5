"""Deep-feature caching (DeepCache) in the DDIM loops: exact outside them, approximate inside, recorded."""

from __future__ import annotations

import pytest
import torch
from synthesis_support import toy_batch

from lesiongen.synthesis.feature_cache import FeatureCachedUNet, cached_steps

DEMO_BASE = "lesiongen/assets/demo-base.safetensors"  # trained weights: its features change smoothly over steps


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_pipe():
    from lesiongen.diffusion.loading import load_pipeline

    pipe = load_pipeline(DEMO_BASE)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe


def _inputs(unet, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    return latents, torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)


def test_the_full_pass_is_the_unet_and_deep_features_are_reused_only_inside_a_loop(tiny_pipeline_dir):
    from lesiongen.diffusion.loading import load_pipeline

    unet = load_pipeline(tiny_pipeline_dir).unet.eval()
    cached = FeatureCachedUNet(unet, 3)
    full_passes = []
    full = cached._full
    cached._full = lambda *args: full_passes.append(1) or full(*args)
    (a, states), (b, _) = _inputs(unet, 2, 0), _inputs(unet, 2, 1)
    with torch.no_grad():
        exact_b = unet(b, 400, encoder_hidden_states=states).sample
        for _ in range(2):  # outside a loop: always the exact model
            assert torch.equal(cached(b, 400, states)[0], exact_b)
        assert len(full_passes) == 2
        full_passes.clear()
        with cached_steps(cached):
            outputs = [cached(x, t, states)[0] for x, t in ((a, 500), (b, 400), (b, 400), (a, 300), (b, 400))]
            assert len(full_passes) == 2  # calls 0 and 3 of the loop are full passes, the rest reuse
            assert torch.equal(outputs[3], unet(a, 300, encoder_hidden_states=states).sample)
            # reusing call 0's deep features (input a at t=500) for input b at t=400 is an approximation
            assert not torch.equal(outputs[1], exact_b) and torch.isfinite(outputs[1]).all()
            assert torch.equal(outputs[4], cached._shallow(b, 400, states, cached._deep))
            cached(torch.cat([b, b]), 400, torch.cat([states, states]))  # another batch: a full pass
            assert len(full_passes) == 3
        assert cached(b, 400, states)[0].equal(exact_b)  # the loop is over: exact again


def test_cached_loops_stay_close_to_the_exact_ones(demo_pipe, toy_manifest):
    """On the trained demo base, a cache every 2 steps moves the round trip and the variants only a little
    (measured on 28 toy images, 50 steps: variants 54.5 dB from the exact ones, inversion PSNR +0.2 dB)."""
    from lesiongen.synthesis.inversion import DDIMSchedule, InversionConfig, invert, measure_round_trip
    from lesiongen.synthesis.latents import psnr
    from lesiongen.synthesis.variants import VariantConfig, sample_variants, variant_seed

    images, latents, cond, uncond = toy_batch(demo_pipe, toy_manifest)
    schedule = DDIMSchedule(demo_pipe.scheduler.config, 20)
    config = VariantConfig(per_image=2, strength=0.6, guidance=5.0)
    seeds = [variant_seed(0, f"image-{i}", k) for i in range(2) for k in range(2)]
    results = []
    for unet in (demo_pipe.unet, FeatureCachedUNet(demo_pipe.unet, 2)):
        inversion = invert(unet, schedule, latents, cond, uncond, InversionConfig(steps=20), sampling_guidance=5.0,
                           depth=schedule.level_for_strength(config.strength))
        round_trip = measure_round_trip(unet, demo_pipe.vae, schedule, inversion, images)
        results.append((round_trip, sample_variants(unet, demo_pipe.vae, schedule, inversion, config, seeds=seeds)))
    (exact_trip, exact_variants), (cached_trip, cached_variants) = results
    assert not torch.equal(cached_variants, exact_variants)  # the cache did change something ...
    assert psnr(cached_variants, exact_variants).min() > 35  # ... but little
    assert (cached_trip.inversion_psnr - exact_trip.inversion_psnr).abs().max() < 1.0


def test_unsupported_unets_and_intervals_are_named(tiny_pipeline_dir):
    from lesiongen.diffusion.loading import load_pipeline

    unet = load_pipeline(tiny_pipeline_dir).unet
    with pytest.raises(ValueError, match="interval must be >= 2"):
        FeatureCachedUNet(unet, 1)
    unet.register_to_config(class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type"):
        FeatureCachedUNet(unet, 2)


@pytest.mark.slow
def test_compiled_passes_match_the_eager_ones(tiny_pipeline_dir):
    """`--compile --feature-cache N` compiles the full and the shallow pass apart (opt-in: CPU compiling)."""
    from lesiongen.diffusion.loading import load_pipeline

    unet = load_pipeline(tiny_pipeline_dir).unet.eval()
    eager, compiled = FeatureCachedUNet(unet, 2), FeatureCachedUNet(torch.compile(unet), 2, compile=True)
    (a, states), (b, _) = _inputs(unet, 2, 0), _inputs(unet, 2, 1)
    with torch.no_grad():
        outputs = []
        for cached in (eager, compiled):
            with cached_steps(cached):
                outputs.append([cached(x, t, states)[0] for x, t in ((a, 500), (b, 400), (a, 300))])
    for eager_out, compiled_out in zip(*outputs):
        assert torch.allclose(compiled_out, eager_out, rtol=1e-4, atol=1e-4)
